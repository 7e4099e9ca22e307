"""End-to-end stories built from the other packages: the quickstart (pretrain, then GRPO on Countdown with a control) and the pace files it uses to run two jobs side by side."""
