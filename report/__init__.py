"""See the data: `inspect_output(OUT, "report.html")` writes one self-contained HTML page of an
output folder (summary, dead letters, distributions, a contact sheet of sampled triplets).
The CLI's `prep inspect OUT --out report.html` calls it."""

from prep.report.inspect import format_summary, inspect_output

__all__ = ["format_summary", "inspect_output"]
