#!/usr/bin/env python3
"""Writes a Polyglot (.NET Interactive) F# notebook from a list of cells, outputs cleared.

Usage: make_notebook.py OUT.ipynb < cells.txt, where cells are separated by lines '#%% md' or '#%% fsharp'.
Keeping notebook sources as plain text makes them easy to review; the .ipynb is what editors open.
"""
import json, sys

def main(out):
    cells, kind, buf = [], None, []
    def flush():
        if kind is None:
            return
        text = "\n".join(buf).strip("\n")
        lines = [l + "\n" for l in text.split("\n")]
        lines[-1] = lines[-1].rstrip("\n")
        if kind == "md":
            cells.append({"cell_type": "markdown", "metadata": {}, "source": lines})
        else:
            cells.append({"cell_type": "code", "execution_count": None,
                          "metadata": {"dotnet_interactive": {"language": "fsharp"}, "polyglot_notebook": {"kernelName": "fsharp"}},
                          "outputs": [], "source": lines})
    for line in sys.stdin.read().split("\n"):
        if line.startswith("#%% "):
            flush(); kind, buf = line[4:].strip(), []
        else:
            buf.append(line)
    flush()
    nb = {"cells": cells,
          "metadata": {"kernelspec": {"display_name": ".NET (F#)", "language": "F#", "name": ".net-fsharp"},
                       "language_info": {"file_extension": ".fs", "mimetype": "text/x-fsharp", "name": "F#", "pygments_lexer": "fsharp", "version": "10.0"},
                       "polyglot_notebook": {"kernelInfo": {"defaultKernelName": "fsharp", "items": [{"aliases": [], "languageName": "F#", "name": "fsharp"}]}}},
          "nbformat": 4, "nbformat_minor": 5}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")

if __name__ == "__main__":
    main(sys.argv[1])
