"""The parts of tools/bench_e2e.py: ``variants`` (what is measured), ``profile`` (where a decode step's time
goes), ``loop`` (one variant through its modes and batch sizes, within the time budget) and ``report`` (the
JSON, the markdown table and the plot)."""
