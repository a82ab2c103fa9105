"""Report of a version: PNG figures and a self-contained HTML page.

`write_report(store, version_id)` reads the version's metrics.json and analytics tables and
writes `report/report.html` and `report/<figure>.png` (a build); `rerender_report` renders
them again for `semid report`, never rewriting a committed file with other bytes.
matplotlib is imported only when a figure is drawn.
"""

from semid_dist.report.writer import REPORT_HTML, rerender_report, write_report

__all__ = ["REPORT_HTML", "rerender_report", "write_report"]
