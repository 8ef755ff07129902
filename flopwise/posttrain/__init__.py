"""Post-training under a budget: chat data (JSONL conversations and preference pairs in the common formats,
or built-in questions about the running Python's standard library) for supervised fine-tuning and direct
preference optimization, read strictly so a bad record stops the run with one line naming file, line and field."""
