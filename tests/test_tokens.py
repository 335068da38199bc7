"""Token merging: ToMe on timm ViTs, R-MeeTo on Vision Mamba, merge maps, the benchmark."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import blvit  # noqa: F401
from blvit.tokens import (
    apply_rmeeto,
    apply_tome,
    assignment_from_source,
    bipartite_soft_matching,
    default_r,
    linear_schedule,
    merge_wavg,
    r_schedule,
    remove_rmeeto,
    remove_tome,
    save_merge_map,
    set_tome_r,
)

TINY_VIM = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_classes=10)


def _tiny_vit(seed=0, **kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    cfg.update(kw)
    return VisionTransformer(**cfg).eval()


def _tiny_vim(seed=0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vim_tiny_patch16_224", **TINY_VIM).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# ----------------------------------------------------------------------------------------------
# Bipartite soft matching
# ----------------------------------------------------------------------------------------------


def _reference_matching(metric, r, protected):
    """Straightforward per-sample ToMe matching: returns, per sample, the list of output groups
    (lists of input positions), in ToMe's output order."""
    out = []
    for m in metric:
        t = m.shape[0]
        a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))
        best = []
        for i in a_pos:
            if i < protected:
                best.append((-float("inf"), i, None))
                continue
            sims = [(F.cosine_similarity(m[i], m[j], dim=0).item(), j) for j in b_pos if j >= protected]
            s, j = max(sims)
            best.append((s, i, j))
        best.sort(key=lambda e: -e[0])
        merged = best[:r]
        unmerged = sorted(i for _, i, _ in best[r:])
        groups = {j: [j] for j in b_pos}
        for _, i, j in merged:
            groups[j].append(i)
        out.append([[i] for i in unmerged] + [sorted(groups[j]) for j in b_pos])
    return out


def test_matching_known_answer():
    """Hand-built keys: the obvious pairs merge, sizes add up, the class token stays first."""
    c = 8
    basis = torch.eye(c)
    keys = torch.stack([basis[0],  # 0: class token (identical to token 1, but protected)
                        basis[0],  # 1
                        basis[2],  # 2 (A) == 3 (B): merges
                        basis[2],  # 3
                        basis[4] + 0.01 * basis[5],  # 4 (A) ~ 5 (B): merges
                        basis[4],  # 5
                        basis[6],  # 6 (A): alone
                        basis[7]])[None]  # 7 (B)
    plan = bipartite_soft_matching(keys, r=2, protected=1)
    assert plan.r == 2
    x = torch.arange(8, dtype=torch.float32).view(1, 8, 1)
    merged, size = merge_wavg(plan, x)
    # ToMe order: unmerged A (0, 6), then B (1, 3+2, 5+4, 7)
    assert plan.positions.tolist() == [[0, 6, 1, 3, 5, 7]]
    assert merged.flatten().tolist() == [0.0, 6.0, 1.0, 2.5, 4.5, 7.0]
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 1.0]
    # restore order keeps spatial order
    plan_r = bipartite_soft_matching(keys, r=2, protected=1, order="restore")
    assert plan_r.positions.tolist() == [[0, 1, 3, 5, 6, 7]]
    assert merge_wavg(plan_r, x)[0].flatten().tolist() == [0.0, 1.0, 2.5, 4.5, 6.0, 7.0]


@pytest.mark.parametrize("t,r,protected", [(9, 3, 1), (10, 4, 1), (12, 5, 2), (7, 10, 0)])
def test_matching_against_reference(t, r, protected):
    torch.manual_seed(t)
    metric = torch.randn(3, t, 5)
    plan = bipartite_soft_matching(metric, r, protected=protected)
    expected = _reference_matching(metric, min(r, (t - protected) // 2), protected)
    # identify groups through a one-hot "source" merge
    eye = torch.eye(t).expand(3, t, t)
    groups = plan.merge(eye, mode="amax")
    for b in range(3):
        got = [sorted(torch.nonzero(row).flatten().tolist()) for row in groups[b]]
        want = expected[b]
        if protected > 1:  # protected tokens are moved to the front, in order
            front = [g for g in want if g[0] < protected]
            want = front + [g for g in want if g[0] >= protected]
        assert got == want


def _weighted_mean(x, size):
    return (x.double() * size.double()).sum(1) / size.double().sum(1)


@pytest.mark.parametrize("order,protected", [("tome", 0), ("tome", 1), ("tome", 2), ("restore", 0), ("unordered", 0)])
def test_merge_wavg_preserves_the_size_weighted_mean(order, protected):
    """sum(size * token) / sum(size) over the tokens is unchanged by a merge step (any r up to the cap,
    arbitrary positive sizes as after earlier merges, every output order), and so is sum(size)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 33, 8, generator=g)
    size = torch.rand(3, 33, 1, generator=g) * 3 + 0.5
    for r in (1, 7, 50):  # 50: capped at half the unprotected tokens
        plan = bipartite_soft_matching(torch.randn(3, 33, 5, generator=g), r, protected=protected, order=order)
        merged, new_size = merge_wavg(plan, x, size)
        assert merged.shape[1] == new_size.shape[1] == 33 - min(r, (33 - protected) // 2)
        torch.testing.assert_close(new_size.sum(1), size.sum(1))
        torch.testing.assert_close(_weighted_mean(merged, new_size), _weighted_mean(x, size), rtol=1e-6, atol=1e-6)
    # chained steps from unit sizes: the plain mean of the original tokens is kept throughout
    tokens, sizes = x, None
    for _ in range(4):
        plan = bipartite_soft_matching(tokens, 4, protected=protected, order=order)
        tokens, sizes = merge_wavg(plan, tokens, sizes)
    assert tokens.shape[1] == 33 - 16 and torch.equal(sizes.sum(1), torch.full((3, 1), 33.0))
    torch.testing.assert_close(_weighted_mean(tokens, sizes), x.double().mean(1), rtol=1e-6, atol=1e-6)


def test_r_schedules():
    assert r_schedule(4, 3) == [3, 3, 3, 3]
    assert r_schedule(4, [5, 2]) == [5, 2, 0, 0]
    assert r_schedule(3, (8, -1.0)) == [16, 8, 0]  # ToMe's decreasing schedule
    assert r_schedule(3, (8, 0.0)) == [8, 8, 8]
    assert linear_schedule(5, 8, 0) == [8, 6, 4, 2, 0]
    with pytest.raises(ValueError):
        r_schedule(2, [1, 2, 3])


# ----------------------------------------------------------------------------------------------
# ToMe on timm ViTs
# ----------------------------------------------------------------------------------------------


def test_tome_r0_is_the_unpatched_model():
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        apply_tome(model, r=0)
        assert torch.equal(model(x), ref)
        set_tome_r(model, 2)
        assert not torch.allclose(model(x), ref)
        remove_tome(model)
        assert type(model.blocks[0]).__name__ == "Block" and torch.equal(model(x), ref)
        assert not model.blocks[0].attn.qkv._forward_hooks


def test_tome_counts_sizes_sources():
    model = apply_tome(_tiny_vit(), r=3, trace_source=True)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    info = model._tome_info
    assert out.shape == (2, 10)
    assert info["token_counts"] == [14, 11, 8]  # 17 tokens, r = 3 per layer
    assert torch.equal(info["size"].sum(1).flatten(), torch.full((2,), 17.0))
    source = info["source"]
    assert source.shape == (2, 8, 17)
    assert torch.equal(source.sum(1), torch.ones(2, 17))  # every original token in exactly one token
    assert torch.equal(source[:, 0], F.one_hot(torch.tensor(0), 17).float().expand(2, 17))  # class token alone
    assert torch.equal(source.sum(-1, keepdim=True), info["size"])
    # r larger than possible is capped at half the unprotected tokens
    set_tome_r(model, 50)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert info["token_counts"] == [9, 5, 3]


def test_tome_deit_small_r13_token_counts():
    """ToMe on a full-size timm DeiT-S at 224 with r=13: 197 tokens, 13 fewer after each of the 12
    blocks, 41 at the end; the class token stays alone in front, the sizes add up to 197."""
    import timm

    torch.manual_seed(0)
    model = apply_tome(timm.create_model("deit_small_patch16_224").eval(), r=13, trace_source=True)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    info = model._tome_info
    assert out.shape == (1, 1000)
    assert info["schedule"] == [13] * 12
    assert info["token_counts"] == [184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54, 41]
    assert info["token_counts"] == [197 - 13 * (i + 1) for i in range(12)]
    assert info["size"].shape == (1, 41, 1) and info["size"].sum().item() == 197.0
    assert info["source"][0, 0, 0] == 1 and info["source"][0, 0].sum() == 1  # the class token merged with nothing


def test_tome_proportional_attention_is_exact_for_duplicates():
    """Merging two identical tokens with proportional attention changes nothing for the others."""
    model = _tiny_vit(depth=2)
    x = torch.randn(1, 9, 32)
    x[:, 4] = x[:, 3]  # token 4 (set A) duplicates token 3 (set B): the first pair ToMe merges
    with torch.no_grad():
        ref = model.blocks(x)
        apply_tome(model, r=[1, 0])
        out = model.blocks(x)
    order = [0, 2, 6, 8, 1, 3, 5, 7]  # [unmerged A, B]; 4 folded into 3
    torch.testing.assert_close(out, ref[:, order], rtol=1e-5, atol=1e-5)


def test_tome_distilled_prefix_tokens_stay_first():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                       num_classes=10).eval()
    apply_tome(model, r=3, trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    src = model._tome_info["source"]
    assert src[:, 0, 0].eq(1).all() and src[:, 1, 1].eq(1).all() and src[:, :2].sum(-1).eq(1).all()


# ----------------------------------------------------------------------------------------------
# R-MeeTo on Vision Mamba
# ----------------------------------------------------------------------------------------------


def test_rmeeto_r0_identity_and_removal():
    model = _tiny_vim()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        apply_rmeeto(model, r=0)
        assert torch.equal(model(x), ref)
        apply_rmeeto(model, r=2, layers=[1, 2])
        assert not torch.allclose(model(x), ref)
        remove_rmeeto(model)
        assert torch.equal(model(x), ref)


def test_rmeeto_r0_has_no_released_compare_override():
    """r=0 is the unmerged baseline of an r sweep even on the released layout (24 blocks, merges at
    2, ..., 22), where compare 11 ("released", or explicit as in the configs) would otherwise merge
    at block 22; r > 0 keeps the released override there."""
    import timm

    torch.manual_seed(0)
    # the released layout at a tiny size: 16 patch tokens + the class token, 24 blocks
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, depth=24, embed_dim=16,
                              num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for compare in ("released", 11):
            apply_rmeeto(model, r=0, compare=compare)
            assert model.token_merge.compare is None
            assert torch.equal(model(x), ref)
            assert model.token_merge.token_counts == [17] * 24
        apply_rmeeto(model, r=[0] * 11)  # the per-layer form too
        assert model.token_merge.compare is None and torch.equal(model(x), ref)
        # r = 1: 17 -> 16 -> ... -> 7 at block 20, then the released override at block 22: down to
        # 17 - 11 * 11 < 0 tokens, r capped at half of the 6 patch tokens -> 4
        apply_rmeeto(model, r=1)
        model(x)
    assert model.token_merge.compare == 11
    assert model.token_merge.token_counts[20:] == [7, 7, 4, 4]


def test_rmeeto_shuffled_source_records_every_shuffle():
    """order="shuffled" with trace_source: the source map follows the shuffles (the first merge block's
    included), so each token's covered patches are the ones whose content it carries."""
    from blvit.tokens.rmeeto import RMeeToMerge

    torch.manual_seed(0)
    t, pos = 17, 8  # 16 patches + the middle class token
    hidden = torch.randn(2, t, 6)
    patch_id = torch.arange(16, dtype=torch.float32)
    ids = torch.cat([patch_id[:pos], torch.tensor([-1.0]), patch_id[pos:]])  # the patch each token is
    residual = ids[None, :, None].repeat(2, 1, 3)  # carries the patch id; merged as a size-weighted mean
    merge = RMeeToMerge([1, 1], layers=[0, 1], order="shuffled", shuffle_rate=1.0, trace_source=True)
    h, res = hidden, residual
    for layer in range(3):
        h, res, pos = merge(layer, h, res, pos)
    source = merge.source  # (B, tokens - 1, patches)
    assert source.shape == (2, 14, 16)
    assert torch.equal(source.sum(1), torch.ones(2, 16))  # a partition of the patches
    carried = _cut_cls(res, pos)[..., 0]  # (B, tokens - 1): mean patch id of each token's content
    expected = (source @ patch_id) / source.sum(-1)  # mean id of the patches the map names
    torch.testing.assert_close(carried, expected)
    assert torch.equal(source.sum(-1, keepdim=True), merge.size)


def test_rmeeto_counts_and_class_position():
    model = apply_rmeeto(_tiny_vim(), r=2, layers=[1, 2], trace_source=True)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    merge = model.token_merge
    assert out.shape == (2, 10)
    assert merge.token_counts == [17, 15, 13, 13]  # tokens entering each block
    # proportional position int(pos * (t - r) / t): 8 -> 8 * 15 / 17 = 7 -> 7 * 13 / 15 = 6
    assert merge.cls_positions == [8, 7, 6, 6] and model.token_position == 6
    assert torch.equal(merge.size.sum(1).flatten(), torch.full((2,), 16.0))
    assert torch.equal(merge.source.sum(1), torch.ones(2, 16))  # the 16 patches partitioned
    assert default_layers_for(24) == list(range(2, 23, 2))


def default_layers_for(depth):
    from blvit.mamba import VisionMamba

    with torch.device("meta"):
        model = VisionMamba(depth=depth, embed_dim=192)
    apply_rmeeto(model)
    assert model.token_merge.r == 5  # Vim-Ti default
    return model.token_merge.layers


def _cut_cls(x, pos):
    return torch.cat([x[:, :pos], x[:, pos + 1:]], dim=1)


def _schedule(r, last=None):
    """Tokens entering each of Vim's 24 blocks: r merged at blocks 2, 4, ..., 22; ``last``: the
    count after block 22's merge instead (the released --compare override)."""
    counts = [197 - r * (i // 2) if i >= 2 else 197 for i in range(24)]
    if last is not None:
        counts[22:] = [last, last]
    return counts


@pytest.mark.parametrize("name,r,compare,counts,final_cls", [
    # Vim-S/B, r = 11: 197 -> 76 tokens (ratio 0.31); the released override changes nothing
    ("vim_small_patch16_224", 11, "released", _schedule(11), 34),
    # Vim-Ti, r = 5, the released scripts (--compare left at 11): 197 -> ... -> 147 -> 76 at block 22
    ("vim_tiny_patch16_224", 5, "released", _schedule(5, last=76), 35),
    # Vim-Ti, the paper's text (compare None): 197 -> 142 (ratio 0.14)
    ("vim_tiny_patch16_224", 5, None, _schedule(5), 65),
])
def test_rmeeto_schedules_on_full_size_vim(monkeypatch, name, r, compare, counts, final_cls):
    """R-MeeTo's schedules (r = 11 for Vim-S, 5 for Vim-Ti, merges at blocks 2, 4, ..., 22; the
    released code's and the paper's for Vim-Ti) on a full-size model at 224: the tokens entering
    every block, the class token carried unchanged to its tracked position at every merge, the
    patch order restored, and the size-weighted mean of the patch tokens (hidden states and
    residual stream) kept by every merge."""
    final_tokens = counts[-1]
    import timm
    from blvit.tokens import rmeeto

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    assert default_r(model) == r
    plans = []

    def recording_matching(*args, **kwargs):
        plan = real_matching(*args, **kwargs)
        plans.append(plan)
        return plan

    real_matching = rmeeto.bipartite_soft_matching
    monkeypatch.setattr(rmeeto, "bipartite_soft_matching", recording_matching)
    apply_rmeeto(model, trace_source=True, compare=compare)  # r and layers: the defaults
    merge = model.token_merge
    assert merge.layers == list(range(2, 23, 2)) and merge.r == r
    merges = []

    def checked_merge(layer, hidden, residual, pos):
        size_in = merge.size if layer > 0 else None
        out_hidden, out_residual, out_pos = merge(layer, hidden, residual, pos)
        if out_hidden.shape[1] < hidden.shape[1]:
            t = hidden.shape[1]
            merged = t - out_hidden.shape[1]
            assert merged == r or (layer == 22 and compare is not None)
            assert out_pos == pos * (t - merged) // t  # int(pos * (t - r) / t)
            assert torch.equal(out_hidden[:, out_pos], hidden[:, pos])  # the class token, untouched
            assert torch.equal(out_residual[:, out_pos], residual[:, pos])
            ones = torch.ones(1, t - 1, 1)
            for before, after in ((hidden, out_hidden), (residual, out_residual)):
                torch.testing.assert_close(
                    _weighted_mean(_cut_cls(after, out_pos), merge.size),
                    _weighted_mean(_cut_cls(before, pos), size_in if size_in is not None else ones),
                    rtol=1e-5, atol=1e-5 * before.abs().max().item())
            merges.append((layer, out_hidden.shape[1]))
        return out_hidden, out_residual, out_pos

    model.token_merge = checked_merge
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert merges == [(layer, counts[layer]) for layer in range(2, 23, 2)]
    assert merge.token_counts == counts
    assert merge.cls_positions[-1] == final_cls and model.token_position == final_cls
    # patch order restored: every merge keeps the surviving tokens in increasing input position,
    # so the final tokens are in raster order of their representative patches...
    assert len(plans) == 11
    roots = torch.arange(196)
    for plan in plans:
        assert (plan.positions.diff(dim=1) > 0).all()
        roots = roots[plan.positions[0]]
    assert roots.shape == (final_tokens - 1,) and (roots.diff() > 0).all()
    # ...and each final token covers its representative patch; the 196 patches are partitioned
    source = merge.source[0]
    assert source.shape == (final_tokens - 1, 196)
    assert torch.equal(source.sum(0), torch.ones(196))
    assert torch.equal(source[torch.arange(final_tokens - 1), roots], torch.ones(final_tokens - 1))
    assert torch.equal(source.sum(-1), merge.size[0, :, 0])


def test_rmeeto_merges_hidden_and_residual_identically():
    from blvit.tokens.rmeeto import RMeeToMerge

    torch.manual_seed(0)
    hidden = torch.randn(2, 17, 6)
    residual = 2 * hidden + 1  # any affine image: size-weighted averages commute with it
    merge = RMeeToMerge(r=4, layers=[3])
    merge(0, hidden, None, 8)
    h, res, pos = merge(3, hidden, residual, 8)
    assert h.shape == res.shape == (2, 13, 6) and pos == 8 * 13 // 17 == 6
    torch.testing.assert_close(res, 2 * h + 1)
    assert torch.equal(h[:, pos], hidden[:, 8]) and torch.equal(res[:, pos], residual[:, 8])  # class token intact
    # restore order: representatives (B tokens) and unmerged tokens in increasing spatial order
    patches = torch.cat([hidden[:, :8], hidden[:, 9:]], 1)
    plan = bipartite_soft_matching(patches, 4, order="restore")
    assert (plan.positions.diff(dim=1) > 0).all()
    expected, _ = merge_wavg(plan, patches)
    torch.testing.assert_close(torch.cat([h[:, :6], h[:, 7:]], 1), expected)


def test_rmeeto_unordered_order_differs():
    """The no-order ablation: ToMe's [unmerged A, B] order; the class token at int(pos * (t1 - r) / t1)."""
    model = _tiny_vim()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        restored = apply_rmeeto(model, r=3, layers=[1], compare=None).forward(x)
        unordered = apply_rmeeto(model, r=3, layers=[1], order="unordered", compare=None).forward(x)
    assert model.token_merge.token_counts == [17, 14, 14, 14]
    t1 = 17 // 2  # A tokens of the 16 patch tokens
    assert model.token_merge.cls_positions == [8] + [8 * (t1 - 3) // t1] * 3 == [8, 5, 5, 5]
    assert not torch.allclose(restored, unordered)


def test_rmeeto_shuffle_ablation_is_the_released_partial_permutation():
    """order="shuffled": at each merge block floor(rate * patches) random patch positions are
    permuted among themselves (hidden, residual, sizes alike), the class token stays, then the
    restored-order merge; the schedule is the paper's (the released shuffle model has no compare)."""
    from blvit.tokens.rmeeto import RMeeToMerge

    hidden = torch.arange(17.0)[None, :, None].expand(1, 17, 4).clone()  # token i carries i
    residual = hidden + 100
    merge = RMeeToMerge(r=0, layers=[0], order="shuffled", shuffle_rate=0.5)
    torch.manual_seed(3)
    h, res, pos = merge(0, hidden, residual, 8)
    assert pos == 8 and h[0, 8, 0] == 8 and res[0, 8, 0] == 108  # the class token stays put
    ids = torch.cat([h[0, :8, 0], h[0, 9:, 0]]).long()
    moved = (ids != torch.tensor([i for i in range(17) if i != 8])).sum().item()
    assert sorted(ids.tolist()) == [i for i in range(17) if i != 8]  # a permutation of the patches
    assert 2 <= moved <= int(16 * 0.5)  # at most floor(rate * 16) positions move
    torch.testing.assert_close(res, h + 100)  # the residual moved with the hidden states
    # the same draw as the released code: randperm(n)[:k], then randperm(k), from the global generator
    torch.manual_seed(3)
    chosen = torch.randperm(16)[:8]
    perm = torch.randperm(8)
    expected = torch.tensor([i for i in range(17) if i != 8])
    expected[chosen] = expected[chosen[perm]]
    assert torch.equal(ids, expected)
    # on a model: the paper's token schedule and class positions, different outputs from restore
    model = _tiny_vim()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        restored = apply_rmeeto(model, r=3, layers=[1, 2]).forward(x)
        counts_restore = list(model.token_merge.token_counts)
        torch.manual_seed(0)
        shuffled = apply_rmeeto(model, r=3, layers=[1, 2], order="shuffled", shuffle_rate=0.5).forward(x)
    assert model.token_merge.compare is None and model.token_merge.token_counts == [17, 14, 11, 11]
    assert counts_restore == [17, 14, 11, 11]  # not the released layout: the paper's schedule by default
    assert not torch.allclose(restored, shuffled)
    with pytest.raises(ValueError, match="shuffle_rate=0.3 needs order='shuffled'"):
        RMeeToMerge(r=1, shuffle_rate=0.3)


def test_merging_reduces_flops():
    from blvit.mamba import vim_macs

    model = _tiny_vim()
    base = vim_macs(model)
    apply_rmeeto(model, r=3, layers=[1, 2])
    merged = vim_macs(model)
    assert merged["total"] < base["total"] and merged["scan"] < base["scan"]


def test_bad_merging_settings_raise_clear_errors():
    from blvit.tokens.rmeeto import RMeeToMerge
    from blvit.train.classification import apply_merging

    vim = _tiny_vim()  # 16 patch tokens + the class token, depth 4
    # unknown metric / order
    with pytest.raises(ValueError, match="metric must be 'hidden' or 'residual', got 'keys'"):
        apply_rmeeto(vim, r=2, metric="keys")
    with pytest.raises(ValueError, match="order must be one of 'restore', 'unordered', 'shuffled', got 'tome'"):
        apply_rmeeto(vim, r=2, order="tome")
    # unknown schedule forms: R-MeeTo takes an int or one int per merge layer
    for bad in ("5", 2.5, (5, -0.5), [2, 1.5], -1, True, {"r": 2}):
        with pytest.raises((TypeError, ValueError), match=r"R-MeeTo r|r schedule"):
            apply_rmeeto(vim, r=bad, layers=[1, 2])
    with pytest.raises(ValueError, match="3 r values for 2 merge layers"):
        apply_rmeeto(vim, r=[1, 1, 1], layers=[1, 2])
    with pytest.raises(ValueError, match=r"merge layers \[7\] out of range for a depth-4 model"):
        apply_rmeeto(vim, r=1, layers=[1, 7])
    # ToMe: an int, a per-layer list of ints, or (r, float inflect in [-1, 1])
    vit = _tiny_vit()
    for bad in ("fast", 2.5, (13, 2.0), [2, 0.5], -1, None, {"r": 2}):
        with pytest.raises((TypeError, ValueError), match=r"r schedule|r must be >= 0"):
            apply_tome(vit, r=bad)
        with pytest.raises((TypeError, ValueError), match=r"an int >= 0, a per-layer list of ints >= 0"):
            r_schedule(12, bad)
    with pytest.raises(ValueError, match="r lists 4 layers but the model has 3"):
        apply_tome(vit, r=[1, 1, 1, 1])
    # the trainer's model.merge goes through the same checks
    with pytest.raises(TypeError, match="unknown R-MeeTo r schedule 2.5"):
        apply_merging(_tiny_vim(), {"method": "rmeeto", "r": 2.5})
    with pytest.raises(TypeError, match="unknown r schedule 2.5"):
        apply_merging(_tiny_vit(), {"method": "tome", "r": 2.5})
    # r larger than allowed: at most half of the patch tokens entering a block can merge there
    vim = _tiny_vim()
    with pytest.raises(ValueError, match=r"r=9 at block 1 is larger than allowed: 16 patch tokens enter that block "
                                         r"\(16 before any merge\), so at most 8 can merge there"):
        apply_rmeeto(vim, r=9, layers=[1])
    with pytest.raises(ValueError, match=r"r=6 at block 2 is larger than allowed: 10 patch tokens .* at most 5"):
        apply_rmeeto(vim, r=6, layers=[1, 2])
    assert vim.token_merge is None  # nothing installed by a refused call
    apply_rmeeto(vim, r=8, layers=[1])  # the largest r allowed there
    with torch.no_grad():
        vim(torch.randn(1, 3, 32, 32))
    assert vim.token_merge.token_counts == [17, 9, 9, 9]
    with pytest.raises(ValueError, match=r"r=9 at block 3 is larger than allowed: 16 patch tokens"):
        RMeeToMerge(r=9, layers=[3])(3, torch.randn(2, 17, 6), torch.randn(2, 17, 6), 8)  # checked at run time too


# ----------------------------------------------------------------------------------------------
# Visualisation
# ----------------------------------------------------------------------------------------------


def test_save_merge_map(tmp_path):
    model = apply_tome(_tiny_vit(), r=3, trace_source=True)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    source = model._tome_info["source"][0, 1:, 1:]  # drop the class token row and column
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    path = tmp_path / "merge.png"
    assignment = save_merge_map(path, image, source, grid=(4, 4))
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert assignment.shape == (16,) and set(assignment.tolist()) <= set(range(source.shape[0]))
    assert np.array_equal(assignment, assignment_from_source(source))
    assert len(set(assignment.tolist())) == int((source.sum(1) > 0).sum())  # every non-empty token used
    # an assignment vector works too; a map that is not a partition is refused
    save_merge_map(tmp_path / "a.png", image, assignment, grid=(4, 4))
    with pytest.raises(ValueError, match="partition"):
        assignment_from_source(torch.zeros(3, 16))


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------


def test_benchmark_reports_the_settings_of_the_timed_run():
    """The row's settings are those the merged model ran with (read before the merging is removed):
    the released compare 11 on Vim's 24-block layout, none for the r=0 baseline."""
    from blvit_apps.merging_benchmark import benchmark_model

    kw = dict(batch=1, img_size=64, repeats=1, warmup=0, device=torch.device("cpu"), amp="fp32")
    row = benchmark_model("vim_tiny", r=1, **kw)  # 16 patch tokens + the class token, 24 blocks
    assert row["settings"] == {"r": 1, "layers": list(range(2, 23, 2)), "order": "restore", "metric": "hidden",
                               "compare": 11}
    assert row["merged"]["tokens_final"] == 4  # 17 -> 7 at block 20, then the override: 4
    row = benchmark_model("vim_tiny", r=0, **kw)
    assert row["settings"]["compare"] is None and row["merged"]["tokens_final"] == 17


def test_benchmark_tiny_cpu_run(tmp_path):
    from blvit_apps.merging_benchmark import main

    status = main(["--models", "vim_tiny,deit_small", "--img-size", "64", "--batch", "1", "--repeats", "1",
                   "--warmup", "0", "--device", "cpu", "--r", "vim_tiny=1", "deit_small=4", "--out", str(tmp_path)])
    assert status == 0
    data = json.loads((tmp_path / "bench_merging.json").read_text())
    assert {"device", "batch", "img_size", "scan_backend", "flops_note", "results"} <= set(data)
    assert "analytic" in data["flops_note"]
    assert [row["model"] for row in data["results"]] == ["vim_tiny", "deit_small"]
    for row in data["results"]:
        assert {"method", "settings", "baseline", "merged", "speedup", "flops_ratio"} <= set(row)
        for key in ("images_per_s", "gflops", "scan_gflops", "tokens_final"):
            assert key in row["baseline"] and key in row["merged"]
        assert row["merged"]["gflops"] < row["baseline"]["gflops"] and row["flops_ratio"] < 1
        assert row["merged"]["tokens_final"] < row["baseline"]["tokens_final"] == 17
    assert data["results"][0]["baseline"]["scan_gflops"] > 0
    assert (tmp_path / "bench_merging.md").read_text().count("| vim_tiny |") == 1
    assert (tmp_path / "bench_merging.png").stat().st_size > 1000
