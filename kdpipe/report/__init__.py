"""Reports: the evaluation and export reports in Markdown and their plots (PNG)."""
