"""Every number of the paper (Feng, Russell, Steinhardt, arXiv 2412.04614; OLMo-7B) that our report compares
against, each with where in the paper it comes from (lines of its Markdown copy, paper.md). Nothing else lives
here, and this module imports nothing of ours, so that graft.py, the claims and the renderer can all read the
one copy. Beside it, the authors' own Llama 3.2 1B sweep (AUTHORS_1B, at the end)."""
import json
import math
from pathlib import Path

# --- the metric (Sec. 3, paper.md line 78) ------------------------------------------------------------------

N_CANDIDATES = 20                   # every split has 20 distinct answers (20 cities, languages, names, animals)
CHANCE = (N_CANDIDATES - 1) / 2     # 9.5: the mean 0-indexed rank of a uniform guess among 20 candidates

# --- Table 2: freezing (Sec. 5.3; paper.md lines 182-191, restated in the text at lines 199 and 201) ---------
# row -> (first-hop fact, first-hop impl, second-hop fact, second-hop impl) mean ranks
TABLE2_COLS = (("first_hop", "fact"), ("first_hop", "impl"), ("second_hop", "fact"), ("second_hop", "impl"))
TABLE2 = {
    "None": (0.00, 0.00, 0.00, 1.80),           # the plain finetune
    "Early": (5.10, 8.40, 0.95, 1.85),          # early-middle layers reset to the base after finetuning
    "Late": (0.00, 0.00, 0.10, 6.30),           # late layers reset after finetuning
    "All": (9.20, 9.25, 9.10, 9.50),            # every layer reset: the base model
    "Early (pre)": (0.00, 6.50, 0.00, 0.50),    # early-middle layers never trained
    "Late (pre)": (0.00, 0.10, 0.00, 6.60),     # late layers never trained
}


def table2(row, hop, kind):
    """The paper's Table 2 entry for `row`, `hop` ("first_hop" / "second_hop"), `kind` ("fact" / "impl")."""
    return TABLE2[row][TABLE2_COLS.index((hop, kind))]


# --- Fig. 2: OCR during finetuning (Sec. 5.1, caption at paper.md line 62) -----------------------------------
# The figure gives no numbers in the text; its first point is the base model and its last the plain finetune,
# which are Table 2's "All" and "None" rows. hop -> {"fact": (before, after), "impl": (before, after)}
FIG2 = {hop: {kind: (table2("All", hop, kind), table2("None", hop, kind)) for kind in ("fact", "impl")}
        for hop in ("first_hop", "second_hop")}

# --- Fig. 3: where the extractive scores sit (Sec. 5.2, paper.md line 167); qualitative, no numbers ----------
FIG3_CLAIM = ("informative MLPs at early/middle layers of the name tokens for first-hop updates, at late layers "
              "of the last token for second-hop updates; downstream scores mostly in the late layers of the last "
              "token")

# --- Fig. 4: data ordering (Sec. 6.1, paper.md line 237); qualitative, no numbers in the text ---------------
FIG4_CLAIM = ("OCR on the test facts only where facts precede implications or are mixed with them, not where "
              "implications precede facts, although every ordering learns the training facts and implications")

# --- Table 3: weight grafting (Sec. 6.2; paper.md lines 240-246, restated in the text at line 263) -----------
TABLE3_COLS = ("Impl F'", "Impl F", "F'")
TABLE3 = {
    "W_F'": (9.13, 8.55, 0.00),          # trained on the counterfactual facts F'
    "W_graft": (1.13, 3.30, 0.10),       # W_F' + (W_F,ImplF - W_F)
    "W~_graft": (8.38, 0.43, 0.32),      # W_F' + (W_ImplF - W), the control
}

# --- Fig. 6: downstream against grafting-informative scores (Sec. 6.2, paper.md line 265) -------------------
# "for both MLP components and attention heads, there is a statistically significant positive correlation
# between the two metrics. However, the Pearson correlation is small": no r or p is given in the text.
FIG6_CLAIM = "a statistically significant positive, but small, Pearson correlation, for MLPs and for heads"

# --- the authors' own Llama 3.2 1B sweep: the nearest published anchor below 7B ------------------------------
# Their grafting table at every cell of lr {1e-6, 3e-6, 1e-5, 3e-5} x epochs {4, 8, 12, 16} (constant rate,
# 5 seeds, every parameter trained), the numbers printed in their figure sweep-figs/hf/weight-llama_1b.pdf of the
# public repository jiahai-feng/extractive-structures; authors_llama_1b.json beside this file holds them as
# {"cells": {"lr 1e-05 x 8 epochs": {"W_F'": {"F", "Impl F", "F'", "Impl F'"}, "W_graft": ..., "W~_graft": ...}}}.
AUTHORS_1B = json.loads((Path(__file__).parent / "authors_llama_1b.json").read_text())
AUTHORS_1B_LRS = (1e-6, 3e-6, 1e-5, 3e-5)
AUTHORS_1B_EPOCHS = (4, 8, 12, 16)
# Their hop and ordering curves (hop-llama_1b.pdf, data-llama_1b.pdf) give no printed numbers: read by eye,
# approximate, at 1e-5 x 8-16 unless said
AUTHORS_1B_READ = {
    "fig2_first_hop": "facts 0 from 3e-6 x 8 up; implications end about 1-3",
    "fig2_second_hop": "facts 0 from 3e-6 x 8 up; implications end about 2-5",
    "fig4": "joint about 1-4, facts-first 3-6, impl-first 7-9; facts-first keeps its facts (about 0-1)",
}


def authors_1b_cell(lr, epochs):
    """The authors' 1B cell nearest to ours: the same number of epochs (the nearest of theirs) and their lr nearest
    on a log scale (ours, for a 135M model, sits above their grid: then their largest, 3e-5)."""
    lr_ = min(AUTHORS_1B_LRS, key=lambda x: abs(math.log(x) - math.log(lr or 3e-5)))
    ep = min(AUTHORS_1B_EPOCHS, key=lambda x: abs(x - (epochs or 8)))
    key = f"lr {lr_:.0e} x {ep} epochs"                          # as the JSON names them: "lr 1e-05 x 8 epochs"
    return key, AUTHORS_1B["cells"][key]
