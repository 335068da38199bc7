"""Kinetics-style video data (blvit.data.video): list files, PyAV decoding, the released sparse
sampling, bad input, and video classification through tools/train.py."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from blvit.data.video import (VideoClipDataset, VideoDataError, check_videos_exist, decode_frames, read_video_list,  # noqa: E402
                              render_video, sparse_indices, write_video, write_video_dataset)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video_dataset(root, num_classes=4, train_per_class=16, val_per_class=6, frames=24, size=64, seed=0)
    return root


def test_list_format_and_decoding(videos):
    samples = read_video_list(videos / "train.csv", videos)
    assert len(samples) == 64 and {label for _, label in samples} == {0, 1, 2, 3}
    first = (videos / "train.csv").read_text().splitlines()[0]
    assert first.endswith(" 0") and first.startswith("videos/train/")
    frames, count = decode_frames(samples[0][0], [0, 12, 23, 40])
    assert count == 24 and frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[2], frames[3])  # past the end: the last frame
    # the written video is the rendered one, up to H.264 at crf 18
    rendered = render_video(np.random.default_rng(5), 1, frames=6)
    write_video(videos / "one.mp4", rendered)
    decoded, _ = decode_frames(str(videos / "one.mp4"))
    assert decoded.shape == rendered.shape and np.abs(decoded.astype(float) - rendered).mean() < 6
    # the released lists separate with ", ": read too
    (videos / "comma.csv").write_text(f"{samples[0][0]},2\n")
    assert read_video_list(videos / "comma.csv") == [(samples[0][0], 2)]


def test_sparse_sampling_is_the_released_rule():
    """Kinetics_sparse (VideoMamba's K400 runs): s = (L - 1) / T; training picks a frame in
    [round(s i), round(s (i + 1))]; test clip k of K picks round(s i) + int(s / (K + 1) (k + 1))."""
    length, t = 300, 8
    s = (length - 1) / t
    expected = [[int(np.round(s * i)) + int(s / 5 * (k + 1)) for i in range(t)] for k in range(4)]
    got = [sparse_indices(length, t, None, k, 4).tolist() for k in range(4)]
    assert got == expected
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = sparse_indices(length, t, rng)
        assert all(int(np.round(s * i)) <= v <= int(np.round(s * (i + 1))) for i, v in enumerate(idx))
    assert sparse_indices(5, 8, None).max() <= 4  # short videos repeat frames, never run past the end


def test_training_clip_and_test_views(videos):
    train = VideoClipDataset.from_list(videos / "train.csv", videos, num_frames=8, img_size=32, flip=False)
    item = train[3]
    assert item["video"].shape == (3, 8, 32, 32) and item["target"].item() == 0
    again = train[3]
    torch.testing.assert_close(item["video"], again["video"])  # seeded per (seed, epoch, index, rank)
    train.set_epoch(1)
    assert not torch.equal(train[3]["video"], item["video"])
    test = VideoClipDataset.from_list(videos / "val.csv", videos, num_frames=8, img_size=32, training=False,
                                      test_clips=4, test_crops=3)
    assert test[0]["video"].shape == (12, 3, 8, 32, 32)  # 4 clips x 3 crops


def test_bad_lists_and_videos_get_clear_messages(videos, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("\n# nothing\n")
    with pytest.raises(VideoDataError, match="empty.csv: empty list file"):
        read_video_list(empty)
    bad = tmp_path / "bad.csv"
    bad.write_text("videos/a.mp4 0\nvideos/b.mp4 dog\n")
    with pytest.raises(VideoDataError, match="bad.csv:2: expected"):
        read_video_list(bad)
    with pytest.raises(VideoDataError, match="label 7 outside 0..3"):
        (tmp_path / "range.csv").write_text("a.mp4 7\n")
        read_video_list(tmp_path / "range.csv", num_classes=4)
    with pytest.raises(VideoDataError, match="no such list file"):
        read_video_list(tmp_path / "nope.csv")
    # a list pointing at missing videos: skipped with a warning naming them, fatal with strict or when all are gone
    real = read_video_list(videos / "train.csv", videos)[:2]
    mixed = real + [(str(tmp_path / "gone.mp4"), 1)]
    with pytest.warns(UserWarning, match="gone.mp4"):
        assert check_videos_exist(mixed, Path("list.csv"), strict=False) == real
    with pytest.raises(VideoDataError, match="1 of 3 listed videos do not exist: .*gone.mp4"):
        check_videos_exist(mixed, Path("list.csv"), strict=True)
    with pytest.raises(VideoDataError, match="2 of 2"):
        check_videos_exist([(str(tmp_path / "x.mp4"), 0), (str(tmp_path / "y.mp4"), 1)], Path("list.csv"), strict=False)
    # a corrupt video: skipped with a warning naming it, an error with strict
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    data = VideoClipDataset([(str(corrupt), 0)], num_frames=4, img_size=32)
    with pytest.warns(UserWarning, match="corrupt.mp4: not a decodable video"):
        assert data[0] is None
    with pytest.raises(VideoDataError, match="corrupt.mp4"):
        VideoClipDataset([(str(corrupt), 0)], num_frames=4, img_size=32, strict=True)[0]


def test_eval_video_averages_the_views(videos, tmp_path):
    """blvit-eval video: 2 clips x 3 crops per video, softmax probabilities averaged; the table's
    top-1 is the one computed by hand from the model's logits on the same views."""
    import timm

    from eval.cli import run

    kwargs = dict(img_size=32, num_frames=8, embed_dim=64, depth=2, num_classes=4)
    torch.manual_seed(0)
    model = timm.create_model("videomamba_tiny", **kwargs).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "vm.pth")
    report = run(["video", "--data", str(videos), "--model", "videomamba_tiny@embed_dim=64,depth=2,num_classes=4:"
                  + str(tmp_path / "vm.pth"), "--img-size", "32", "--clips", "2", "--crops", "3", "--max-videos", "6",
                  "--workers", "0", "--out", str(tmp_path / "video.json")])
    row = report["models"][0]
    assert row["views"] == "2 x 3" and row["videos"] == 6 and row["clips_per_s"] > 0 and row["gmacs_per_view"] > 0
    data = VideoClipDataset.from_list(videos / "val.csv", videos, num_frames=8, img_size=32, training=False,
                                      test_clips=2, test_crops=3)
    data.samples = data.samples[:: len(data.samples) // 6][:6]
    correct = 0
    with torch.no_grad():
        for i in range(6):
            item = data[i]
            correct += int(model(item["video"]).softmax(-1).mean(0).argmax() == item["target"])
    assert row["top1"] == pytest.approx(100 * correct / 6)
    assert (tmp_path / "video.md").read_text().startswith("| model | frames | views |")


@pytest.mark.heavy(seconds=90)
def test_tiny_videomamba_learns_the_motions_through_the_trainer(tmp_path):
    """configs/video/quickstart.yaml through the trainer, shortened to 6 epochs (96 steps) on the
    generated videos: validation top-1 goes from chance (25 %, 4 motions) to well above it. The
    labels are motion directions, so a model blind to the frames' order could reach only ~50 %
    (the motion's axis); above that it tells the direction's sign."""
    from blvit.train.classification import train
    from blvit.train.config import load_config

    root = tmp_path / "videos"
    write_video_dataset(root, num_classes=4, train_per_class=64, val_per_class=16, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(ROOT / "configs/video/quickstart.yaml",
                          [f"data.root={root}", f"output_dir={tmp_path / 'run'}", "seed=0", "train.epochs=6"]))
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    top1 = [r["val_top1"] for r in rows if "val_top1" in r]
    print(f"\nvalidation top-1 per epoch on 64 videos (chance 25 %): {top1}")
    assert top1[0] <= 40.0  # untrained: about chance
    assert max(top1[-2:]) >= 65.0, top1  # well above chance, and above the ~50 % that the axis alone gives


def test_labels_outside_the_models_classes_name_the_list_line(videos, tmp_path):
    """A label the model has no output for (7 with 4 classes) is an error naming the list file
    and line, in the trainer and in blvit-eval video, not an index error inside the loss."""
    from blvit.train.classification import train
    from blvit.train.config import load_config
    from eval.cli import run

    # class 3 relabelled 7: still 4 distinct labels, so the class count check cannot see it
    lines = (videos / "val.csv").read_text().splitlines()
    lines = [line[:-2] + " 7" if line.endswith(" 3") else line for line in lines]
    first = 1 + next(i for i, line in enumerate(lines) if line.endswith(" 7"))
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    cfg = load_config(ROOT / "configs/video/quickstart.yaml",
                      [f"data.root={videos}", f"data.train_list={tmp_path / 'bad.csv'}", "data.val_list=null",
                       f"output_dir={tmp_path / 'run'}", "train.epochs=1", "train.batch_size=4"])
    with pytest.raises(VideoDataError, match=rf"bad.csv:{first}: label 7 outside 0\.\.3"):
        train(cfg)
    with pytest.raises(VideoDataError, match=rf"bad.csv:{first}: label 7 outside 0\.\.3"):
        run(["video", "--data", str(videos), "--list", str(tmp_path / "bad.csv"), "--model",
             "videomamba_tiny@embed_dim=64,depth=2,num_classes=4", "--img-size", "32", "--clips", "1", "--crops", "1",
             "--max-videos", "2", "--workers", "0", "--out", str(tmp_path / "video.json")])
