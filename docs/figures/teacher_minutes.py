"""Draws docs/figures/teacher_minutes.png: the quick-start teacher's held-out box mIoU against its
training time on the 2-core CPU (issue 14). The figures are the measured runs of docs/method.md
("Training SAM from scratch on a CPU"): each trained over two one-thread DDP processes with 8 images
per step and scored with `blvit-eval prompts --prompt box` on the 96 generated held-out images
(331 objects; the filled ground-truth box scores 0.661). Run: python docs/figures/teacher_minutes.py
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (teacher training seconds, held-out box mIoU, label), one series per optimizer and data size
SERIES = [
    ("AdamW, 400 images", "s--", "tab:blue", [(199, 0.657, "500 steps"), (600, 0.735, "1500"), (1176, 0.774, "3000")]),
    ("AdamW, 1600 images", "s", "tab:blue", [(1081, 0.799, "3000")]),
    ("Muon, 400 images", "o-", "tab:orange", [(174, 0.704, "400 steps (the quick start)"), (234, 0.725, "500")]),
    ("Muon, 1600 images", "o--", "tab:red", [(664, 0.804, "1600"), (948, 0.822, "2400")]),
    ("Muon, 1600 images, data.mask_size=input", "D", "tab:purple", [(1335, 0.821, "2400")]),
]
FILLED_BOX, TARGET = 0.661, 0.80
TEACHER_SHARE = 153  # seconds of the 5-minute command that train the teacher (fresh clone, 4 m 15 s)


def main(out: Path = Path(__file__).with_name("teacher_minutes.png")) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, style, colour, runs in SERIES:
        ax.plot([x / 60 for x, _, _ in runs], [y for _, y, _ in runs], style, color=colour, label=name)
        for x, y, label in runs:
            ax.annotate(label, (x / 60, y), textcoords="offset points", xytext=(5, -11), fontsize=7)
    ax.axhline(FILLED_BOX, color="grey", lw=1, ls=":")
    ax.text(8, FILLED_BOX + 0.004, "filled GT box (0.661)", fontsize=8, color="grey")
    ax.axhline(TARGET, color="tab:red", lw=1, ls=":")
    ax.text(23, TARGET + 0.004, "issue 14's target (0.80)", fontsize=8, color="tab:red", ha="right")
    ax.axvline(TEACHER_SHARE / 60, color="tab:green", lw=1)
    ax.text(TEACHER_SHARE / 60 + 0.2, 0.765, "teacher's share of\nthe 5-minute quick start", fontsize=8,
            color="tab:green")
    ax.set(xlabel="teacher training time on the 2-core CPU (minutes)", ylabel="held-out box mIoU (96 images)",
           xlim=(0, 23.5), ylim=(0.63, 0.84), title="Quick-start teacher: accuracy against training minutes")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
