"""Training: config errors, bad samples, resume equivalence, learning."""
import json
from pathlib import Path
import warnings

import pytest
import torch

from blvit.data.sa1b import SA1BDataset, SampleError, find_samples
from blvit.data.synthetic import write_sa1b
from blvit.train.config import ConfigError, load_config
from sam_adapter.trainer import train

QUICK = "configs/sam/quickstart.yaml"


@pytest.fixture(scope="module")
def sa1b_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sa1b")
    write_sa1b(root, 8, seed=0)
    return root


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*valid keys in train.*'max_steps'"):
        load_config(QUICK, ["train.max_step=3"])
    cfg = load_config(QUICK, ["train.max_steps=3", "data.root=/x"])
    assert cfg["train"]["max_steps"] == 3 and cfg["data"]["root"] == "/x"


@pytest.mark.parametrize("override, message", [
    ("train.amp=bfloat16", r"train.amp must be one of \('auto', 'bf16', 'none'\).*'bfloat16'"),
    ("train.amp=off", r"'train.amp' must be a string, got False"),  # YAML reads off as false
    ("train.lr=true", r"'train.lr' must be a number, got True"),
    ("train.lr=", r"train.lr must be a number >= 0, got None"),
    ("train.lr=-1e-3", r"train.lr must be a number >= 0, got -0.001"),
    ("train.betas=0.9", r"'train.betas' must be a list, got 0.9"),
    ("data.root=1e5", r"'data.root' must be a string, got 100000.0"),
    ("teacher.checkpoint.path=/x.pth", r"'teacher.checkpoint' is a single value, not a mapping"),
    ("data.box_fraction=[0.5]", r"'data.box_fraction' must be a number"),
])
def test_overrides_of_the_wrong_kind_are_refused(override, message):
    """Each of these used to be accepted and either ran something else silently (train.amp=off:
    float32; train.lr=true: lr 1) or failed later with an error that named no key."""
    with pytest.raises(ConfigError, match=message):
        load_config(QUICK, [override])


def test_overrides_of_the_right_kind_pass():
    cfg = load_config(QUICK, ["data.val_root=null", "train.amp=none", "train.lr=2e-4", "train.betas=[0.9, 0.95]"])
    assert cfg["data"]["val_root"] is None and cfg["train"]["amp"] == "none" and cfg["train"]["lr"] == 2e-4
    assert load_config(None, ["task=classify", "model.merge.compare=11"])["model"]["merge"]["compare"] == 11
    assert load_config(None, ["task=classify", "model.kwargs={num_classes: 4}"])["model"]["kwargs"] == {"num_classes": 4}
    # null where the code reads it as off / unbounded / all, and the forms of r
    steps_only = load_config(QUICK, ["train.epochs=null", "train.max_steps=5", "train.grad_clip=null",
                                     "data.val_count=null"])
    assert steps_only["train"]["epochs"] is None and steps_only["train"]["grad_clip"] is None
    for r in ("[5, 5]", "[8, -0.5]", "3"):
        load_config(None, ["task=classify", f"model.merge.r={r}"])


def test_one_shard_named_alone_and_options_after_overrides(tmp_path):
    """data.shards=sa_000001.tar (a string, not a list) names one shard (it was read letter by
    letter); tools/train.py takes options after the overrides too."""
    import subprocess
    import sys
    import tarfile

    from blvit.data.sa1b import find_samples
    from blvit.data.synthetic import write_sa1b

    write_sa1b(tmp_path / "files", 2, seed=0)
    with tarfile.open(tmp_path / "sa_000001.tar", "w") as tar:
        for path in sorted((tmp_path / "files").iterdir()):
            tar.add(path, arcname=path.name)
    assert len(find_samples(tmp_path, "sa_000001.tar")) == len(find_samples(tmp_path, ["sa_000001.tar"])) == 2
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "tools/train.py"), "--config", str(QUICK), "train.max_steps=1",
                           "--plan", "--plan-gpus", "2", "data.count=2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| fsdp |" in done.stdout


def test_dotted_model_override_keeps_the_recipes_other_overrides():
    # model.overrides.X=v changes X only: replacing the whole mapping would silently train a
    # full-size ViT-B instead of the recipe's small encoder
    cfg = load_config("configs/sam/quickstart_teacher.yaml", ["model.overrides.embed_dim=96"])
    assert cfg["model"]["overrides"]["embed_dim"] == 96
    assert cfg["model"]["overrides"]["depth"] == 4 and cfg["model"]["overrides"]["out_chans"] == 64
    # a whole mapping as the value still replaces it (model.kwargs={...} in the ImageNet tests)
    whole = load_config("configs/sam/quickstart_teacher.yaml", ["model.overrides={embed_dim: 96}"])
    assert whole["model"]["overrides"] == {"embed_dim": 96}


def test_synthetic_occlusion_cap_and_contrast():
    import numpy as np
    from blvit.data.synthetic import render_image

    for seed in range(20):  # the defaults draw the data they always drew
        image, objects = render_image(seed)
        capped_image, capped = render_image(seed, max_occlusion=1.0, min_contrast=0.0)
        assert (image == capped_image).all() and len(objects) == len(capped)
    hidden = []
    for seed in range(40):
        _, objects = render_image(seed, max_occlusion=0.3)
        _, plain = render_image(seed)
        hidden.append((sum(o["mask"].sum() for o in objects), sum(o["mask"].sum() for o in plain)))
    assert np.mean([a for a, _ in hidden]) > np.mean([b for _, b in hidden])  # more of each object stays visible


def _corrupt_copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    jpgs = sorted(dst.glob("sa_*.jpg"))
    jpgs[0].write_bytes(b"not a jpeg")
    rec = json.loads(jpgs[1].with_suffix(".json").read_text())
    rec["annotations"][0]["segmentation"]["size"] = [10, 10]
    jpgs[1].with_suffix(".json").write_text(json.dumps(rec))
    jpgs[2].with_suffix(".json").write_text(json.dumps({"image": {}}))
    rec = json.loads(jpgs[3].with_suffix(".json").read_text())
    rec["annotations"] = []
    jpgs[3].with_suffix(".json").write_text(json.dumps(rec))
    return jpgs


def test_bad_samples_are_skipped_with_names_or_fatal_when_strict(sa1b_root, tmp_path):
    jpgs = _corrupt_copy(sa1b_root, tmp_path / "bad")
    ds = SA1BDataset(find_samples(tmp_path / "bad"), img_size=256, max_masks=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert sum(item is None for item in items) == 4
    text = "\n".join(str(w.message) for w in caught)
    assert f"{jpgs[0]}: corrupt or unreadable image" in text
    assert "is [10, 10] but the image is [240, 320]" in text
    assert "no 'annotations'" in text and "image has no masks" in text
    strict = SA1BDataset(find_samples(tmp_path / "bad"), img_size=256, strict=True)
    with pytest.raises(SampleError, match="corrupt or unreadable image"):
        strict[0]


def _corrupt_at(root: Path, dst: Path, position: int, seed: int = 0) -> None:
    """Copy ``root`` to ``dst`` with the image that one process's shuffled epoch 0 reads at
    ``position`` made unreadable."""
    from torch.utils.data import DistributedSampler

    dst.mkdir()
    for f in root.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    refs = find_samples(dst)
    order = list(DistributedSampler(range(len(refs)), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True))
    Path(refs[order[position]].image[0]).write_bytes(b"not a jpeg")


def test_a_skipped_batch_still_closes_its_accumulation_window(sa1b_root, tmp_path):
    """Gradient accumulation over 2 batches of 1 image, the second image of the epoch unreadable:
    the first window steps with what it has; its gradient is not carried into the next window."""
    _corrupt_at(sa1b_root, tmp_path / "bad", 1)
    cfg = load_config(QUICK, [f"data.root={tmp_path / 'bad'}", f"output_dir={tmp_path / 'run'}", "train.epochs=1",
                              "train.batch_size=1", "train.global_batch=2", "data.val_root=null", "data.workers=0"])
    with pytest.warns(UserWarning, match="corrupt or unreadable image"):
        summary = train(cfg)
    assert summary["steps"] == 4 and summary["skipped"] == 1
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "loss" in r] == [0, 0, 0, 0]  # 8 images, 4 windows of 2: all in epoch 0


def test_truncated_tar_shard(tmp_path):
    (shard,) = write_sa1b(tmp_path, 4, images_per_shard=4)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="sa_000000.tar"):
        refs = find_samples(tmp_path)
    assert 0 < len(refs) < 4
    with pytest.raises(SampleError, match="sa_000000.tar"):
        find_samples(tmp_path, strict=True)


def _run(root, out, *extra):
    cfg = load_config(QUICK, [f"data.root={root}", f"output_dir={out}", "train.epochs=2", "train.batch_size=2",
                              "train.save_every=1", "data.val_root=null", *extra])
    return cfg


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_gives_the_same_weights(sa1b_root, tmp_path, optimizer):
    """Roll a finished run back to its step-3 checkpoint (what a process killed after step 3
    leaves behind), resume, and compare with the uninterrupted run's final weights."""
    from conftest import interrupted_copy

    chosen = [f"train.optimizer={optimizer}", "train.muon_lr=0.01"]
    full = train(_run(sa1b_root, tmp_path / "full", "train.keep_last=10", *chosen))
    ckpts = interrupted_copy(tmp_path / "full", tmp_path / "part", step=3)
    result = train(_run(sa1b_root, tmp_path / "part", "train.keep_last=2", *chosen), resume=True)
    assert result["steps"] == full["steps"] == 8
    a = torch.load(tmp_path / "full/checkpoints/step_8.pth", weights_only=True)["model"]
    b = torch.load(ckpts / "step_8.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    first = torch.load(tmp_path / "full/checkpoints/step_1.pth", weights_only=True)["model"]
    assert any(not torch.equal(first[k], a[k]) for k in a)  # training did change the weights
    assert len(list(ckpts.glob("step_*.pth"))) == 2  # keep_last
    assert (ckpts / "best.pth").exists() and (tmp_path / "part/loss_curve.png").exists()


def test_resume_mid_epoch_continues_the_random_stream(sa1b_root, tmp_path):
    """SAM's corrective clicks and mask-only rounds draw from the global generator: a run resumed
    from a mid-epoch checkpoint gives the uninterrupted run's losses and weights exactly (starting
    the epoch's loader used to take one draw more after the restored state)."""
    from conftest import interrupted_copy

    teacher = Path(__file__).resolve().parents[1] / "configs/sam/quickstart_teacher.yaml"

    def cfg(out, *extra):
        return load_config(teacher, [f"data.root={sa1b_root}", f"output_dir={out}", "train.epochs=2",
                                     "train.batch_size=2", "train.save_every=1", "data.val_root=null",
                                     "loss.click_rounds=1", "loss.refine_rounds=1", "data.max_masks=2", *extra])

    train(cfg(tmp_path / "full", "train.keep_last=10"))
    ckpts = interrupted_copy(tmp_path / "full", tmp_path / "part", step=2)
    train(cfg(tmp_path / "part"), resume=True)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for run in ("full", "part")]
    assert len(losses[0]) == 8 and losses[1] == losses[0][2:]  # the resumed run logs steps 3..8
    a = torch.load(tmp_path / "full/checkpoints/step_8.pth", weights_only=True)["model"]
    b = torch.load(ckpts / "step_8.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs/sam").glob("*.yaml")))
def test_recipes_are_valid_configs(recipe):
    from sam_adapter.config import make_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/sam" / recipe)
    overrides = dict(cfg["model"]["overrides"])
    if cfg["model"]["keep_ratio"] is not None:  # null: the variant's default, as the trainer reads it
        overrides["keep_ratio"] = cfg["model"]["keep_ratio"]
    make_config(cfg["model"]["variant"], **overrides)
    if recipe.endswith("_sa1b.yaml"):  # the paper's Table 2 recipe: 10 epochs, 2 % of SA-1B, batch 8, distilled
        assert (cfg["train"]["epochs"], cfg["data"]["fraction"], cfg["train"]["global_batch"]) == (10, 0.02, 8)
        assert (cfg["task"], cfg["loss"]["distill_weight"], cfg["train"]["lr"]) == ("sam_distill", 2.5, 1e-4)


def test_teacher_embedding_cache(sa1b_root, tmp_path):
    """Distilling from cached teacher embeddings gives the losses of the live teacher (bf16 storage)."""
    base = ["data.val_root=null", "train.max_steps=2", "train.batch_size=2", f"data.root={sa1b_root}"]
    live = train(load_config(QUICK, base + [f"output_dir={tmp_path / 'live'}"]))
    cache = tmp_path / "cache"
    cached = train(load_config(QUICK, base + [f"output_dir={tmp_path / 'cached'}", f"teacher.cache_dir={cache}"]))
    assert len(list(cache.glob("*.pt"))) == 8 and (cache / "meta.json").exists()
    assert cached["final"]["distill"] == pytest.approx(live["final"]["distill"], rel=2e-2)
    assert cached["final"]["mask"] == pytest.approx(live["final"]["mask"], rel=1e-3)
    with pytest.raises(ValueError, match="meta.json: the cache was made for"):
        train(load_config(QUICK, base + [f"output_dir={tmp_path / 'other'}", f"teacher.cache_dir={cache}", "seed=1"]))


def test_teacher_cache_follows_the_files_not_their_names(tmp_path):
    """Data rewritten in place is computed again (entries are keyed by each file's name and size,
    not its name alone), a copy of the data elsewhere (a node-local disk) finds the same entries,
    and a retrained teacher saved over the same path is another teacher: its meta differs, so
    the old cache is refused."""
    import shutil

    from blvit.data.sa1b import SA1BDataset, find_samples
    from blvit.data.synthetic import write_sa1b
    from blvit.train.teacher_cache import build_cache
    from conftest import TINY
    from sam_adapter.build import build_sam_blvit
    from sam_adapter.trainer import _teacher_meta

    def samples(root):
        return SA1BDataset(find_samples(root), img_size=TINY["img_size"], max_masks=2)

    write_sa1b(tmp_path / "data", 3, seed=3)
    dataset = samples(tmp_path / "data")
    sam = build_sam_blvit("vit_b", **TINY)
    teacher_file = tmp_path / "teacher.pth"
    torch.save(sam.state_dict(), teacher_file)
    cfg = {"teacher": {"checkpoint": str(teacher_file)}, "seed": 0}
    meta = _teacher_meta(cfg, sam.image_encoder, TINY["img_size"], amp=False)
    cache, cpu = tmp_path / "cache", torch.device("cpu")
    assert build_cache(sam.image_encoder, dataset, cache, meta, cpu, False, 2) == len(dataset) > 0
    assert build_cache(sam.image_encoder, dataset, cache, meta, cpu, False, 2) == 0
    # the same files copied elsewhere, teacher included: nothing to compute
    shutil.copytree(tmp_path / "data", tmp_path / "node_local")
    shutil.copy(teacher_file, tmp_path / "node_local_teacher.pth")
    copied = dict(cfg, teacher={"checkpoint": str(tmp_path / "node_local_teacher.pth")})
    copied_meta = _teacher_meta(copied, sam.image_encoder, TINY["img_size"], amp=False)
    assert copied_meta == meta
    assert build_cache(sam.image_encoder, samples(tmp_path / "node_local"), cache, meta, cpu, False, 2) == 0
    # the data generated again in place (other images under the same names)
    write_sa1b(tmp_path / "data", 3, seed=4)
    assert build_cache(sam.image_encoder, samples(tmp_path / "data"), cache, meta, cpu, False, 2) == len(dataset)
    # a retrained teacher saved over the same file
    with torch.no_grad():
        sam.image_encoder.patch_embed.proj.weight.add_(0.01)
    torch.save(sam.state_dict(), teacher_file)
    retrained = _teacher_meta(cfg, sam.image_encoder, TINY["img_size"], amp=False)
    with pytest.raises(ValueError, match="meta.json: the cache was made for"):
        build_cache(sam.image_encoder, dataset, cache, retrained, cpu, False, 2)
    assert _teacher_meta(cfg, sam.image_encoder, TINY["img_size"], amp=True) != retrained  # another precision


def test_forward_intermediates_matches_forward():
    from conftest import TINY_BT
    from sam_adapter.build import build_sam_blvit

    torch.manual_seed(0)
    encoder = build_sam_blvit("b+t", keep_ratio=0.5, **TINY_BT).image_encoder.eval()
    x = torch.randn(2, 3, TINY_BT["img_size"], TINY_BT["img_size"])
    with torch.no_grad():
        out, maps = encoder.forward_intermediates(x, [3, 1])
        torch.testing.assert_close(out, encoder(x), rtol=0, atol=0)
        assert [tuple(m.shape) for m in maps] == [(2, 16, 16, TINY_BT["embed_dim"])] * 2
        # the last block's map through the neck is the output
        torch.testing.assert_close(encoder.neck(maps[0].permute(0, 3, 1, 2)), out)
    with pytest.raises(ValueError, match=r"intermediate layers \[4\] out of range: the encoder has blocks 0..3"):
        encoder.forward_intermediates(x, [4])


def test_intermediate_layer_distillation(sa1b_root, tmp_path):
    """A student equal to its teacher (keep ratio 1, gammas 0) has zero intermediate-layer loss;
    a different student a positive one; training logs and lowers it; bad settings are refused."""
    from sam_adapter.trainer import SamTrainingModule, build_models

    cfg = load_config(QUICK, ["model.keep_ratio=1.0", "loss.distill_layers=[1,2]", "loss.mask_weight=0"])
    student, teacher = build_models(cfg)
    student.image_encoder.load_state_dict(teacher.state_dict(), strict=False)
    module = SamTrainingModule(student, cfg["loss"]).eval()
    batch = {"image": torch.randn(2, 3, student.image_encoder.img_size, student.image_encoder.img_size)}
    with torch.no_grad():
        t_out, t_maps = teacher.forward_intermediates(batch["image"], [1, 2])
        same = module(batch, t_out, t_maps)
        assert same["distill_layers"].item() == pytest.approx(0, abs=1e-5)
        assert same["distill"].item() == pytest.approx(0, abs=1e-5)
        student.image_encoder.blocks[0].mlp.lin1.weight.mul_(3)  # (an added constant would vanish after LayerNorm)
        differ = module(batch, t_out, t_maps)
    assert differ["distill_layers"].item() > 1e-3

    base = [f"data.root={sa1b_root}", "data.val_root=null", "train.batch_size=2", "train.epochs=3",
            "train.lr=3e-3", "train.warmup_steps=0"]
    result = train(load_config(QUICK, base + [f"output_dir={tmp_path / 'layers'}", "loss.distill_layers=[1,3]"]))
    rows = [json.loads(line) for line in (tmp_path / "layers/metrics.jsonl").read_text().splitlines()]
    curve = [r["distill_layers"] for r in rows if "distill_layers" in r]
    assert len(curve) == result["steps"] == 12
    assert sum(curve[-3:]) < 0.8 * sum(curve[:3]), curve
    with pytest.raises(ValueError, match=r"distill_layers \[7\]: block indices must be integers in 0..3"):
        train(load_config(QUICK, base + [f"output_dir={tmp_path / 'bad'}", "loss.distill_layers=7"]))
    with pytest.raises(ValueError, match="cannot be combined with teacher.cache_dir"):
        train(load_config(QUICK, base + [f"output_dir={tmp_path / 'bad2'}", "loss.distill_layers=[1]",
                                         f"teacher.cache_dir={tmp_path / 'cache'}"]))


def test_tensorboard_scalars_equal_the_metrics_log(sa1b_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(load_config(QUICK, [f"data.root={sa1b_root}", "data.val_root=null", "train.max_steps=3",
                              "train.batch_size=2", f"output_dir={out}", "train.tensorboard=true"]))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "distill", "mask", "lr"):
        logged = [(r["step"], r[key]) for r in rows if key in r]
        assert len(logged) == 3, key
        board = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in board] == [s for s, _ in logged]
        assert [v for _, v in board] == pytest.approx([v for _, v in logged], rel=1e-6)


def test_ema_weights_are_validated_and_saved_as_best(sa1b_root, tmp_path):
    """With train.ema_decay, validation scores the averaged weights and best.pth holds them; the
    step checkpoints keep the raw weights (what resuming continues from) and the average beside."""
    cfg = load_config(QUICK, [f"data.root={sa1b_root}", f"data.val_root={sa1b_root}", f"output_dir={tmp_path}",
                              "train.epochs=1", "train.batch_size=2", "train.ema_decay=0.5"])
    train(cfg)
    step = torch.load(tmp_path / "checkpoints/step_4.pth", weights_only=False)
    best = torch.load(tmp_path / "checkpoints/best.pth", weights_only=False)
    ema = {k.removeprefix("module."): v for k, v in step["train_state"]["ema"].items() if k.startswith("module.")}
    trained = [k for k, v in step["model"].items() if v.dtype.is_floating_point and not torch.equal(v, ema[k])]
    assert trained, "the average of 4 steps at decay 0.5 differs from the last weights"
    assert best["best"]["step"] == 4  # one validation, after the epoch's 4 steps
    for k in step["model"]:  # best.pth: the average, not the raw weights
        torch.testing.assert_close(best["model"][k], ema[k], rtol=0, atol=0, msg=k)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val_box_miou" in r for r in records)


def test_adamw_betas_reach_the_optimizer_and_bad_ones_are_refused(sa1b_root, tmp_path):
    cfg = load_config(QUICK, [f"data.root={sa1b_root}", "data.val_root=null", f"output_dir={tmp_path}",
                              "train.max_steps=1", "train.batch_size=2", "train.betas=[0.8, 0.95]",
                              "train.optimizer=adamw"])
    summary = train(cfg)
    state = torch.load(tmp_path / "checkpoints/step_1.pth", weights_only=False)["train_state"]["optimizer"]
    assert {tuple(g["betas"]) for g in state["param_groups"]} == {(0.8, 0.95)}
    # the summary the loop returns is also on disk (what the quick start reads after torchrun)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for bad in ("[0.9]", "[0.9, 1.0]"):
        cfg["train"]["betas"] = load_config(QUICK, [f"train.betas={bad}"])["train"]["betas"]
        with pytest.raises(ValueError, match="train.betas"):
            train(dict(cfg, output_dir=str(tmp_path / "bad")))


def test_prompt_pe_scale_scales_the_fourier_frequencies_and_survives_the_checkpoint(sa1b_root, tmp_path):
    """model.prompt_pe_scale multiplies the random frequencies of a from-scratch prompt encoder
    (SAM draws them with std 1); they are a buffer, so evaluation reads the trained model's own."""
    from sam_adapter.build import build_sam_from_checkpoint
    from sam_adapter.trainer import build_models

    common = [f"data.root={sa1b_root}", "data.val_root=null", "train.max_steps=1", "train.batch_size=2"]
    frequencies = {}
    for scale in (1.0, 0.5):
        cfg = load_config(QUICK, common + [f"output_dir={tmp_path / str(scale)}", f"model.prompt_pe_scale={scale}"])
        torch.manual_seed(cfg["seed"])  # what the trainer seeds before it builds the models
        sam, _ = build_models(cfg)
        frequencies[scale] = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.clone()
    torch.testing.assert_close(frequencies[0.5], 0.5 * frequencies[1.0], rtol=0, atol=0)
    summary = train(cfg)
    trained = build_sam_from_checkpoint(summary["best_checkpoint"])
    # the trained model's checkpoint carries the scaled draw
    saved = trained.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    torch.testing.assert_close(saved, frequencies[0.5], rtol=0, atol=0)
    with pytest.raises(ValueError, match="prompt_pe_scale"):
        build_models(dict(cfg, model=dict(cfg["model"], prompt_pe_scale=0)))


def test_an_epoch_holds_whole_accumulation_windows(sa1b_root, tmp_path):
    """8 images in batches of 3 with 2-batch accumulation: one window per epoch, its last two
    images dropped (as drop_last drops a partial batch), not carried into the next epoch's step."""
    cfg = load_config(QUICK, [f"data.root={sa1b_root}", f"output_dir={tmp_path / 'run'}", "train.epochs=3",
                              "train.batch_size=3", "train.global_batch=6", "data.val_root=null", "data.workers=0"])
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 3 and [r["epoch"] for r in rows if "loss" in r] == [0, 1, 2]


def test_the_logged_learning_rate_is_the_one_the_step_used(sa1b_root, tmp_path):
    from blvit.train.loop import lr_lambda

    cfg = load_config(QUICK, [f"data.root={sa1b_root}", f"output_dir={tmp_path}", "train.max_steps=3",
                              "train.batch_size=2", "train.warmup_steps=2", "data.val_root=null", "train.optimizer=adamw"])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    schedule = lr_lambda(2, 3, cfg["train"]["min_lr_ratio"])
    assert [r["lr"] for r in rows] == pytest.approx([cfg["train"]["lr"] * schedule(s) for s in range(3)])


def test_take_evenly_spreads_over_the_whole_list():
    from blvit.data.imagenet import take_evenly

    classes = [c for c in range(10) for _ in range(10)]  # class-sorted, like an ImageFolder's samples
    for count in (10, 30, 60, 99):
        picked = take_evenly(classes, count)
        assert len(picked) == count and set(picked) == set(range(10)), count
    assert take_evenly(classes, None) == classes and take_evenly(classes, 500) == classes


def test_keep_last_below_one_is_refused(sa1b_root, tmp_path):
    cfg = load_config(QUICK, [f"data.root={sa1b_root}", f"output_dir={tmp_path}", "train.keep_last=0", "data.val_root=null"])
    with pytest.raises(ValueError, match="train.keep_last=0"):
        train(cfg)


def test_interrupted_data_generation_is_not_trusted_later(tmp_path, monkeypatch):
    """Settings A written, a run with settings B stopped half-way, then A again: the old manifest
    used to survive and A's run returned at once over B's partial data."""
    from blvit.data import make_synthetic

    small = dict(train=2, val=1, heldout=1, height=48, width=64)
    make_synthetic.ensure_synthetic(tmp_path, **small)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(make_synthetic, "write_instances", stopped)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic.ensure_synthetic(tmp_path, **dict(small, height=96, width=128))
    assert not (tmp_path / "manifest.json").exists()
    monkeypatch.undo()
    manifest = make_synthetic.ensure_synthetic(tmp_path, **small)
    assert Path(manifest["heldout_coco"]).exists()
    from PIL import Image

    first = sorted((tmp_path / "sa1b_train").glob("sa_*.jpg"))[0]
    assert Image.open(first).size == (64, 48)
