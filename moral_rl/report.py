"""Build one static HTML page for a set of runs and their evaluation.

  python -m moral_rl.report results/grid results/unlearning \
      --eval_dir=results/eval --out=results/report

The page `<out>/index.html` links its figures relatively from
`<out>/figures/` (each PNG has its data as CSV beside it), so the folder
can be copied or served as it is. It shows the action types over training
per reward and the unlearning runs (from each run's history.json), a table
of the runs' final action types, the regret figures and a table of the
evaluation pooled per model group, and the follow-up answers. A script in
the page writes how many images loaded into `data-images-loaded` of the
body, which the headless-browser check reads (launch/check_report.sh).
"""

import argparse
import html
import json
import os
import sys

from moral_rl import evaluate as evaluate_lib
from moral_rl import figures
from moral_rl import run_folders

REPORT_FILE = "index.html"
FIGURES_SUBDIR = "figures"

# Final action types shown per run, as (history key, column label).
RUN_COLUMNS = (("actions/c_given_c", "C|C"), ("actions/c_given_d", "C|D"),
               ("actions/d_given_c", "D|C"), ("actions/d_given_d", "D|D"),
               ("actions/illegal", "illegal"))

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.5em; text-align: right; }
td.text { text-align: left; max-width: 40em; white-space: pre-wrap; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""

# Counts the images that decoded (naturalWidth > 0) once the page loaded.
_IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
});
"""


def _table(header, rows, text_columns=()) -> str:
    cells = ["<tr>" + "".join(f"<th>{html.escape(str(h))}</th>"
                              for h in header) + "</tr>"]
    for row in rows:
        cells.append("<tr>" + "".join(
            f"<td class=\"text\">{html.escape(str(value))}</td>"
            if i in text_columns else f"<td>{html.escape(str(value))}</td>"
            for i, value in enumerate(row)) + "</tr>")
    return "<table>\n" + "\n".join(cells) + "\n</table>"


def _figure(path, out_dir, caption) -> str:
    relative = os.path.relpath(path, out_dir).replace(os.sep, "/")
    data = relative[:-len(".png")] + ".csv"
    return (f"<figure><img src=\"{html.escape(relative)}\" "
            f"alt=\"{html.escape(caption)}\"><figcaption>"
            f"{html.escape(caption)} (<a href=\"{html.escape(data)}\">data"
            "</a>)</figcaption></figure>")


def _final_record(folder, history):
    path = os.path.join(folder, "final_metrics.json")
    if os.path.isfile(path):
        with open(path) as f:
            final = json.load(f)
        return final["step"], {key: sum(values) / len(values) for key, values
                               in final["metrics"].items()}
    return history[-1]["step"], history[-1]


def _training_section(folders, figure_dir, out_dir) -> str:
    runs, rows = [], []
    for folder in folders:
        config = run_folders.load_config(folder)
        history = run_folders.load_history(folder)
        runs.append((config, history))
        if not history:
            continue
        step, record = _final_record(folder, history)
        rows.append([os.path.basename(os.path.normpath(folder)),
                     run_folders.reward_label(config), config.opponent,
                     config.seed, step]
                    + [f"{record[key]:.3f}" for key, _ in RUN_COLUMNS])
    parts = ["<h2>Training</h2>"]
    captions = {"action_types_by_reward": "Action types over training, "
                "summed over the runs of each reward",
                "unlearning": "Unlearning runs; dashed lines mark the reward "
                "switch"}
    for path in figures.write_training_figures(runs, figure_dir):
        name = os.path.basename(path)[:-len(".png")]
        parts.append(_figure(path, out_dir, captions[name]))
    parts.append("<h3>Final action types per run</h3>")
    parts.append(_table(["run", "reward", "opponent", "seed", "update"]
                        + [label for _, label in RUN_COLUMNS], rows))
    return "\n".join(parts)


def _interval(row, name):
    return (f"{row[f'{name}_mean']:.3f} [{row[f'{name}_ci_low']:.3f}, "
            f"{row[f'{name}_ci_high']:.3f}]")


def _evaluation_section(eval_dir, figure_dir, out_dir) -> str:
    path = os.path.join(eval_dir, evaluate_lib.METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{eval_dir!r} has no {evaluate_lib.METRICS_FILE}; run "
            "python -m moral_rl.evaluate --out=<folder> first.")
    rows = figures.read_csv(path)
    parts = [f"<h2>Evaluation ({html.escape(eval_dir)})</h2>",
             f"<p>Opponent {html.escape(str(rows[0]['opponent']))}, action "
             f"strings {html.escape(str(rows[0]['action_strings']))}, "
             f"{int(rows[0]['num_games'])} test games x "
             f"{int(rows[0]['num_seeds'])} seeds per model; means with 95% "
             "confidence intervals, pooled over the models of each group."
             "</p>"]
    for figure_path in figures.write_regret_figures(rows, figure_dir):
        variant = os.path.basename(figure_path)[len("regret_"):-len(".png")]
        parts.append(_figure(figure_path, out_dir,
                             f"Regret per game, prompt variant {variant}"))

    table = []
    for variant in dict.fromkeys(row["variant"] for row in rows):
        for pooled in figures.regret_by_group(rows, variant):
            table.append([pooled["group"], pooled["game"], variant,
                          pooled["n"], _interval(pooled, "deontological"),
                          _interval(pooled, "utilitarian")])
    parts.append("<h3>Regret per group, game and prompt variant</h3>")
    parts.append(_table(["group", "game", "variant", "test games",
                         "deontological regret", "utilitarian regret"],
                        table))
    parts.append("<h3>Per model</h3>")
    parts.append(_table(
        ["model", "game", "variant", "cooperation", "illegal",
         "deontological regret", "utilitarian regret"],
        [[row["model"], row["game"], row["variant"],
          _interval(row, "cooperation"), _interval(row, "illegal"),
          _interval(row, "deontological_regret"),
          _interval(row, "utilitarian_regret")] for row in rows]))

    followups_path = os.path.join(eval_dir, evaluate_lib.FOLLOWUPS_FILE)
    if os.path.isfile(followups_path):
        with open(followups_path) as f:
            records = json.load(f)
        if records:
            parts.append("<h3>Follow-up questions</h3>")
            parts.append(_table(
                ["model", "game", "answer", "question", "reply"],
                [[r["model"], r["game"], r["answer"], r["question"],
                  r["reply"]] for r in records], text_columns=(2, 3, 4)))
    return "\n".join(parts)


def build_report(folders=(), eval_dirs=(), out_dir="results/report", *,
                 title="moral_rl report") -> str:
    """Write the HTML page and its figures; see the module doc.

    Args:
      folders: run and sweep folders whose training to show.
      eval_dirs: output folders of `moral_rl.evaluate`.
      out_dir: the report folder, created if missing.
      title: the page title.

    Returns:
      The path of index.html.
    """
    if not folders and not eval_dirs:
        raise ValueError("The report needs run folders or --eval_dir.")
    figure_dir = os.path.join(out_dir, FIGURES_SUBDIR)
    os.makedirs(figure_dir, exist_ok=True)
    sections = []
    if folders:
        sections.append(_training_section(
            run_folders.expand_folders(folders), figure_dir, out_dir))
    for index, eval_dir in enumerate(eval_dirs):
        # Each evaluation gets its own figure folder, as names repeat.
        sub = os.path.join(figure_dir, f"eval{index}")
        os.makedirs(sub, exist_ok=True)
        sections.append(_evaluation_section(eval_dir, sub, out_dir))

    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">"
        f"\n<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n"
        f"<script>{_IMAGE_CHECK}</script>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections)
        + "\n</body>\n</html>\n")
    path = os.path.join(out_dir, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def main(argv=None) -> int:
    """Build the report from command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m moral_rl.report",
        description="Build one static HTML page for runs and evaluations.")
    parser.add_argument("folders", nargs="*",
                        help="run folders and sweep folders")
    parser.add_argument("--eval_dir", action="append", default=[],
                        help="output folder of moral_rl.evaluate (repeat "
                             "for several)")
    parser.add_argument("--out", default="results/report",
                        help="report folder (default: results/report)")
    parser.add_argument("--title", default="moral_rl report",
                        help="page title")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    path = build_report(args.folders, args.eval_dir, args.out,
                        title=args.title)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
