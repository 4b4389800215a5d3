"""Compare-policies reports: report.md, a self-contained report.html (plots embedded), PNG plots.

Runs are grouped into comparable groups (same task, task arguments and model); each group gets
its table (policies side by side, the best value of each column marked when one run holds it),
the task's own tables, and its plots, one colour per policy across the report, dense as a black
dashed reference, legends beside the axes.

    tables.py     comparable groups, the Markdown/HTML table, escaping of hostile strings
    plots.py      one plot function per curve kind (PLOTS; `register_plot` for a plugin task's
                  curves), and the plots across budgets (throughput, accuracy, Pareto)
    document.py   report.md and report.html
"""

from streambench.results.report.document import write_report
from streambench.results.report.plots import PLOTS, plots, register_plot
from streambench.results.report.tables import comparable, group, table

__all__ = ["PLOTS", "comparable", "group", "plots", "register_plot", "table", "write_report"]
