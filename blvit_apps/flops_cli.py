"""``blvit-flops``: encoder FLOPs of dense SAM vs bLViT-SAM, measured and analytic, side by side."""
import argparse
import json
from pathlib import Path
from typing import Dict, List, Sequence


from blvit.flops import analytic_sam_encoder_macs, count_macs_on_meta

from sam_adapter.build import build_sam_from_config, stock_encoder
from sam_adapter.config import DENSE_SOURCE, VARIANTS, make_config
from sam_adapter.image_encoder import BigLittleImageEncoder


def flops_rows(variants: Sequence[str] = ("b+t", "h+b"), keep_ratio: float = 0.25, img_size: int = 1024) -> List[Dict]:
    """One row per encoder: the stock SAM encoder each variant replaces, this toolkit's dense
    encoder of that layout (it skips projecting window padding), then the variant.

    MACs are measured with FlopCounterMode (on the meta device) and computed analytically.
    """
    shape = (1, 3, img_size, img_size)
    rows = []
    stock_macs: Dict[str, float] = {}
    dense_macs: Dict[str, float] = {}
    for variant in variants:
        stock_name = DENSE_SOURCE[variant]
        if stock_name not in stock_macs:  # the family's two reference rows, once
            stock = stock_macs[stock_name] = count_macs_on_meta(lambda: stock_encoder(stock_name, img_size), shape)
            rows.append(dict(encoder=f"SAM {stock_name} (segment_anything)", gmacs=stock / 1e9, analytic_gmacs=None,
                             ratio=1.0, ratio_dense=None))
            dense_cfg = make_config(stock_name, img_size=img_size)
            dense = dense_macs[stock_name] = count_macs_on_meta(lambda: BigLittleImageEncoder(dense_cfg), shape)
            rows.append(dict(encoder=f"dense {stock_name} (blvit, SDPA)", gmacs=dense / 1e9,
                             analytic_gmacs=analytic_sam_encoder_macs(dense_cfg)["total"] / 1e9, ratio=dense / stock,
                             ratio_dense=1.0))
        stock, dense = stock_macs[stock_name], dense_macs[stock_name]
        if VARIANTS[variant].get("reduction"):  # token-reduction baselines at their defaults; no analytic count
            cfg = make_config(variant, img_size=img_size)
            setting = f"merge r {cfg.merge_r}" if cfg.reduction == "tome" else f"keep {cfg.keep_ratio}"
            measured = count_macs_on_meta(lambda: build_sam_from_config(cfg).image_encoder, shape)
            rows.append(dict(encoder=f"{variant} {setting}", gmacs=measured / 1e9, analytic_gmacs=None,
                             ratio=measured / stock, ratio_dense=measured / dense))
            continue
        cfg = make_config(variant, keep_ratio=keep_ratio, img_size=img_size)
        measured = count_macs_on_meta(lambda: BigLittleImageEncoder(cfg), shape)
        rows.append(dict(encoder=f"bLViT-SAM {variant} keep {keep_ratio}", gmacs=measured / 1e9,
                         analytic_gmacs=analytic_sam_encoder_macs(cfg)["total"] / 1e9, ratio=measured / stock,
                         ratio_dense=measured / dense))
    return rows


def markdown_table(rows: List[Dict]) -> str:
    """``ratio``: against the stock SAM encoder; ``ratio_dense``: against this toolkit's dense
    encoder of the same layout (what the speed-ups of blvit-bench are measured against)."""
    lines = ["| encoder | GMACs (FlopCounterMode) | GMACs (analytic) | vs stock SAM | vs dense (blvit) |",
             "|---|---|---|---|---|"]
    for r in rows:
        analytic = "" if r["analytic_gmacs"] is None else f"{r['analytic_gmacs']:.1f}"
        vs_dense = "" if r["ratio_dense"] is None else f"{r['ratio_dense']:.3f}x"
        lines.append(f"| {r['encoder']} | {r['gmacs']:.1f} | {analytic} | {r['ratio']:.3f}x | {vs_dense} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", nargs="+", default=["b+t", "h+b"], choices=sorted(VARIANTS),
                        help="bLViT-SAM variants or token-reduction baselines (evit-b, tome-h, ...; at their "
                             "default keep / merge), each next to its dense and stock SAM encoders")
    parser.add_argument("--keep-ratio", type=float, default=0.25, help="of b+t / h+b")
    parser.add_argument("--img-size", type=int, default=1024)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = flops_rows(args.variants, args.keep_ratio, args.img_size)
    print(f"Image encoder cost at {args.img_size}x{args.img_size}, batch 1 (1 MAC = 2 FLOPs)")
    print(markdown_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
