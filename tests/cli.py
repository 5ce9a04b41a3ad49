"""Running the command line inside a test: `main.main` with its exit code, as a shell would see it."""
import main


def run(capsys, *args):
    """main.main(args) -> (exit code, stdout, stderr); argparse's own exits count as exit codes too."""
    try:
        code = main.main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err
