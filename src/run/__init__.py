"""One run, apart from the loop itself: its config, building what the config describes, checkpoints, the
run directory and its lock, loading a trained run back, the device, and the published code's checkpoints."""
