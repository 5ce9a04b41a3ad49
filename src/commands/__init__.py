"""What each command of the command line does, as library functions a notebook can call too: start_run
(train.py), evaluate_run (evaluate.py), analyze_runs (analyze.py), compare, demo, summarize_groups,
import_checkpoint, make_data. main.py only turns flags into their arguments; nothing else imports them."""
