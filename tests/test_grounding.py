"""Dense grounding: patch maps, heatmaps at image size, segmentation, its metrics, data layout and commands."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bridge.cli import main
from bridge.grounding import heatmaps, label_pixels, parse_class_list, refine_with_image, segment
from bridge.synthetic import CLASS_NAMES, SyntheticWorld
from bridge.zeroshot import check_class_names, encode_class_names
from training.data import DataError, load_mask, load_segmentation_folder
from training.evaluate import confusion_matrix, evaluate_segmentation, pointing_hit, segmentation_metrics
from training.losses import dense_loss

TEXTS = ["a red circle", "a blue square", "a green star"]


@pytest.fixture(scope="module")
def scene_image():
    return SyntheticWorld(seed=1, image_size=56).scene(0).render()


def test_patch_similarity_is_the_cosine_of_each_text_with_each_patch(tiny_bridge, scene_image):
    maps = tiny_bridge.patch_similarity(scene_image, TEXTS)
    assert maps.shape == (3, 4, 4)  # 56 px at patch 14
    patches = tiny_bridge.encode_image_patches([scene_image])[0]  # (16, E), normalised
    expected = patches @ tiny_bridge.encode_text(TEXTS).T
    torch.testing.assert_close(maps, expected.T.reshape(3, 4, 4))
    assert maps.abs().max() <= 1 + 1e-5


def test_a_window_sized_heatmap_without_shifts_is_the_upsampled_patch_map(tiny_bridge, scene_image):
    maps = heatmaps(tiny_bridge, scene_image, TEXTS, shifts=1, refine=0)
    expected = F.interpolate(
        tiny_bridge.patch_similarity(scene_image, TEXTS)[None], size=(56, 56), mode="bilinear"
    )[0]
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=0)


def test_heatmaps_of_a_wide_image_cover_it_at_its_own_size(tiny_bridge):
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 200, 3), dtype=np.uint8))
    maps = heatmaps(tiny_bridge, wide, TEXTS)  # sliding windows along the width, 2x2 shifts
    assert maps.shape == (3, 60, 200)
    assert torch.isfinite(maps).all()
    # Shifted grids mix several patch grids: the map is not constant over any one patch's pixels.
    assert (maps[0, :14, :14].std() > 0).item()
    zoomed = heatmaps(tiny_bridge, wide, TEXTS, scale=112, shifts=1)
    assert zoomed.shape == (3, 60, 200)


def test_refinement_moves_a_blurry_map_onto_the_colour_edge():
    # Left half red, right half blue; the map says "here" with a ramp that crosses the edge at the wrong
    # place. Refined with the image, the score on each side of the edge evens out.
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16] = (220, 40, 40)
    pixels[:, 16:] = (40, 80, 230)
    blurry = torch.linspace(1, 0, 32).expand(32, 32)[None].clone()  # (1, H, W), high on the left
    refined = refine_with_image(blurry, Image.fromarray(pixels), iterations=20)[0]
    left, right = refined[:, :16], refined[:, 16:]
    assert left.std() < 0.5 * blurry[0, :, :16].std() and right.std() < 0.5 * blurry[0, :, 16:].std()
    assert left.min() > right.max()  # the step is now at the colour edge
    torch.testing.assert_close(refine_with_image(blurry, Image.fromarray(pixels), iterations=0), blurry)


def test_segment_labels_background_below_the_threshold_and_best_class_above(tiny_bridge, scene_image):
    everything = segment(tiny_bridge, scene_image, TEXTS, threshold=-2.0)
    nothing = segment(tiny_bridge, scene_image, TEXTS, threshold=2.0)
    assert everything.labels.shape == (56, 56) and everything.scores.shape == (3, 56, 56)
    assert (nothing.labels == 0).all()
    assert (everything.labels == 1 + everything.scores.argmax(0).numpy()).all()
    scores = torch.tensor([[[0.1, 0.6]], [[0.4, 0.2]]])  # 2 classes, a 1x2 image
    assert label_pixels(scores, 0.3).tolist() == [[2, 1]]
    assert label_pixels(scores, 0.5).tolist() == [[0, 1]]


def test_class_names_are_averaged_over_prompt_templates(tiny_bridge):
    one = encode_class_names(tiny_bridge, ["red circle"], templates=("a {}",))
    torch.testing.assert_close(one, tiny_bridge.encode_text(["a red circle"]))
    two = encode_class_names(tiny_bridge, ["red circle"], templates=("a {}", "{}"))
    mean = tiny_bridge.encode_text(["a red circle", "red circle"]).mean(0, keepdim=True)
    torch.testing.assert_close(two, F.normalize(mean, dim=-1))


def test_bad_class_lists_and_tiny_images_fail_with_clear_errors(tiny_bridge):
    with pytest.raises(ValueError, match="no class name given"):
        check_class_names([])
    with pytest.raises(ValueError, match=r"class name 2 of 3 is empty or only whitespace \('   '\)"):
        check_class_names(["cat", "   ", "dog"])
    with pytest.raises(ValueError, match="no class name given"):
        parse_class_list("  ")
    assert parse_class_list(" cat, dog ,sofa") == ["cat", "dog", "sofa"]
    small = Image.new("RGB", (13, 40))
    message = "image is 13x40 pixels, smaller than one 14-pixel patch"
    with pytest.raises(ValueError, match=message):
        tiny_bridge.patch_similarity(small, "a cat")
    with pytest.raises(ValueError, match=message):
        segment(tiny_bridge, small, ["cat"])


def test_confusion_matrix_and_miou_with_and_without_background():
    target = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
    predicted = np.array([[0, 1, 1, 1], [0, 2, 0, 0]])
    confusion = confusion_matrix(predicted, target, num_classes=3)
    assert confusion.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]  # the 255 pixel counts nowhere
    metrics = segmentation_metrics(confusion)
    iou = [2 / 4, 2 / 3, 1 / 2]  # background, class 1, class 2
    assert metrics["mIoU"] == pytest.approx(np.mean(iou))
    assert metrics["mIoU_no_background"] == pytest.approx(np.mean(iou[1:]))
    assert metrics["pixel_accuracy"] == pytest.approx(5 / 7)
    with pytest.raises(ValueError, match="the mask holds label 7 but there are 3 classes"):
        confusion_matrix(predicted, np.full((2, 4), 7), num_classes=3)


def test_pointing_game_asks_whether_the_peak_is_inside_the_mask():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True
    heatmap = torch.zeros(4, 4)
    heatmap[2, 1] = 1.0
    assert pointing_hit(heatmap, mask)
    heatmap[0, 3] = 2.0
    assert not pointing_hit(heatmap, mask)


def write_segmentation_folder(root, scenes, palette: bool = True) -> None:
    """The VOC/ADE layout: images/*.png, masks/*.png (label per pixel), classes.txt (background first)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(["background", *CLASS_NAMES]) + "\n")
    for index, scene in enumerate(scenes):
        scene.render().save(root / "images" / f"scene{index}.png")
        labels = Image.fromarray(scene.label_map().astype(np.uint8), mode="L")
        if palette:  # VOC stores its masks as palette images
            labels = labels.convert("P")
            labels.putpalette([value for i in range(256) for value in (i, 255 - i, i // 2)])
        labels.save(root / "masks" / f"scene{index}.png")


def test_a_voc_palette_and_an_ade_greyscale_folder_read_the_same_labels(tmp_path):
    scenes = SyntheticWorld(seed=2, image_size=56).scenes(0, 3)
    for palette in (True, False):
        root = tmp_path / f"palette-{palette}"
        write_segmentation_folder(root, scenes, palette)
        samples, class_names = load_segmentation_folder(root)
        assert class_names == ["background", *CLASS_NAMES]
        assert [s[0].rsplit("/", 1)[1] for s in samples] == ["scene0.png", "scene1.png", "scene2.png"]
        assert (load_mask(samples[1][1]) == scenes[1].label_map()).all()


def test_a_bad_segmentation_folder_fails_naming_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="'classes.txt' is missing"):
        load_segmentation_folder(tmp_path)
    write_segmentation_folder(tmp_path, SyntheticWorld(seed=2, image_size=56).scenes(0, 2))
    (tmp_path / "masks" / "scene1.png").unlink()
    with pytest.raises(DataError, match=r"scene1.png' has no label mask \(looked for"):
        load_segmentation_folder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "masks" / "scene1.png")
    with pytest.raises(DataError, match="is a RGB image; label masks are palette or greyscale"):
        load_mask(tmp_path / "masks" / "scene1.png")


def test_evaluate_segmentation_at_the_extreme_thresholds(tiny_bridge):
    scenes = SyntheticWorld(seed=2, image_size=56).scenes(0, 4)
    samples = [(scene.render(), scene.label_map()) for scene in scenes]
    names = ["background", *CLASS_NAMES]
    # All background: only the background class scores, with IoU = background pixels / all pixels.
    empty = evaluate_segmentation(tiny_bridge, samples, names, threshold=2.0)
    background = sum((s.label_map() == 0).sum() for s in scenes) / (4 * 56 * 56)
    assert empty["mIoU_no_background"] == 0.0
    assert empty["pixel_accuracy"] == pytest.approx(background)
    assert empty["objects"] == sum(len({o.class_name for o in s.objects}) for s in scenes)
    assert 0.0 <= empty["pointing"] <= 1.0
    # Several thresholds: the best one's metrics, and the same pointing game (it needs no threshold).
    best = evaluate_segmentation(tiny_bridge, samples, names, threshold=(2.0, -2.0))
    assert best["threshold"] in (2.0, -2.0) and best["pointing"] == empty["pointing"]
    assert best["mIoU"] >= empty["mIoU"]


@pytest.fixture(scope="module")
def saved_tiny_bridge(tmp_path_factory, tiny_bridge):
    directory = tmp_path_factory.mktemp("bridge")
    tiny_bridge.save_pretrained(directory)
    return directory


def test_eval_segmentation_command_on_a_voc_layout_folder(tmp_path, saved_tiny_bridge, capsys):
    write_segmentation_folder(tmp_path / "voc", SyntheticWorld(seed=2, image_size=56).scenes(0, 3))
    args = ["eval", "segmentation", "--model", str(saved_tiny_bridge), "--data", str(tmp_path / "voc")]
    assert main([*args, "--json", "--threshold", "1"]) == 0  # no cosine lies above 1: all background
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 3 and metrics["classes"] == 25 and metrics["threshold"] == 1.0
    assert metrics["mIoU_no_background"] == 0.0 and 0 < metrics["mIoU"] <= 1
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "with background" in out and "pointing game" in out


def test_ground_and_segment_commands_write_their_pictures(tmp_path, saved_tiny_bridge, scene_image, capsys):
    image = tmp_path / "scene.png"
    scene_image.resize((84, 70)).save(image)
    model = ["--model", str(saved_tiny_bridge)]
    assert main(["ground", str(image), *TEXTS, *model, "--out", str(tmp_path / "heat.png")]) == 0
    assert Image.open(tmp_path / "heat.png").size == (3 * 84, 70)
    assert capsys.readouterr().out.count("peak cosine") == 3
    seg = tmp_path / "seg.png"
    assert (
        main(["segment", str(image), "--classes", "red circle, blue square", *model, "--out", str(seg)]) == 0
    )
    assert Image.open(seg).size[1] > 70  # the picture, then a legend underneath
    assert "background:" in capsys.readouterr().out


def test_segment_command_errors_name_the_problem(tmp_path, saved_tiny_bridge, capsys):
    image = tmp_path / "scene.png"
    Image.new("RGB", (56, 56)).save(image)
    args = ["segment", str(image), "--model", str(saved_tiny_bridge), "--out", str(tmp_path / "s.png")]
    assert main([*args, "--classes", "cat, ,dog"]) == 2
    assert "class name 2 of 3 is empty or only whitespace" in capsys.readouterr().err
    assert main([*args, "--classes", ""]) == 2
    assert "no class name given" in capsys.readouterr().err
    Image.new("RGB", (10, 10)).save(image)
    assert main([*args, "--classes", "cat"]) == 2
    assert "smaller than one 14-pixel patch" in capsys.readouterr().err
    assert main(["ground", str(image), "cat", "--model", str(tmp_path / "nowhere")]) == 2
    assert "no bridge at" in capsys.readouterr().err


def captions_and_patches_that_show_them() -> tuple[torch.Tensor, torch.Tensor]:
    """8 random captions (8, 32) and 8 images of 16 patches (8, 16, 32): patch 5 of image i shows caption i."""
    torch.manual_seed(0)
    texts = F.normalize(torch.randn(8, 32), dim=-1)
    patches = torch.randn(8, 16, 32)
    patches[:, 5] = texts * 6
    return texts, F.normalize(patches, dim=-1)


def test_the_dense_loss_prefers_images_whose_patches_show_the_caption():
    texts, patches = captions_and_patches_that_show_them()
    shuffled = patches[torch.roll(torch.arange(8), 1)]
    scale = torch.tensor(2.3)
    assert dense_loss(patches, texts, scale) < dense_loss(shuffled, texts, scale) - 1.0


def test_the_dense_loss_counts_a_hard_negative_only_where_there_is_one():
    texts, patches = captions_and_patches_that_show_them()
    scale = torch.tensor(2.3)
    without = dense_loss(patches, texts, scale)
    # A near-copy of the caption competes on its own image: the loss rises. Absent ones (zero) change nothing.
    close = F.normalize(texts + 0.02 * torch.randn(8, 32), dim=-1)[:, None]
    assert dense_loss(patches, texts, scale, close) > without + 0.1
    assert torch.allclose(dense_loss(patches, texts, scale, torch.zeros(8, 2, 32)), without)
    # A negative far from what the patches show costs almost nothing.
    assert dense_loss(patches, texts, scale, -texts[:, None]) < without + 0.05


def test_training_with_the_dense_loss_moves_the_patch_embeddings(tmp_path):
    from conftest import tiny_bridge_config

    from bridge.config import RunConfig, TrainConfig
    from training.align import train_text_bridge

    train = TrainConfig(steps=4, batch_size=8, held_out=4, eval_every=0, checkpoint_every=0, warmup_steps=1)
    losses = {}
    for weight in (0.0, 1.0):
        config = RunConfig(tiny_bridge_config(width=32, num_heads=2), replace(train, dense_weight=weight))
        _, result = train_text_bridge(config, "synthetic:24", tmp_path / str(weight), progress=False)
        losses[weight] = result.losses
    # Same seed and data: the first step adds the dense term (about log 8 while nothing is learnt yet).
    assert losses[1.0][0] > losses[0.0][0] + 0.1
    assert all(np.isfinite(losses[1.0]))


def test_grounding_demo_command_prints_both_projectors_and_draws_the_heatmaps(tmp_path, monkeypatch, capsys):
    from conftest import tiny_bridge_config

    import training.demo
    from bridge.config import RunConfig, TrainConfig

    train = TrainConfig(steps=3, batch_size=8, held_out=4, eval_every=0, checkpoint_every=0, warmup_steps=1)
    monkeypatch.setattr(
        training.demo, "RunConfig", lambda: RunConfig(tiny_bridge_config(width=32, num_heads=2), train)
    )
    out = tmp_path / "demo"
    assert main(["demo", "grounding", "--out", str(out), "--scenes", "16", "--eval-scenes", "3"]) == 0
    table = capsys.readouterr().out
    for name in ("CLS-only linear", "patch-token attention, dense"):
        row = next(line for line in table.splitlines() if line.startswith(name))
        assert len(row[len(name) :].split()) == 5  # mIoU, mIoU without background, pointing, threshold, R@1
    assert Image.open(out / "grounding.png").size[0] > 2 * 224
    assert (out / "bridge" / "model.safetensors").exists()


@pytest.mark.slow
def test_grounding_demo_localises_where_the_cls_only_baseline_cannot(tmp_path, capsys):
    """The full `dinobridge demo grounding` (about 26 minutes on 2 busy cores; `.ci/run` runs it)."""
    assert main(["demo", "grounding", "--out", str(tmp_path / "demo")]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        for name in ("CLS-only linear", "patch-token attention, dense"):
            if line.startswith(name):
                rows[name] = [float(x) for x in line[len(name) :].split()]
    baseline, dense = rows["CLS-only linear"], rows["patch-token attention, dense"]
    # Columns: mIoU, mIoU without background, pointing, threshold, text->image R@1.
    assert dense[2] >= 0.9, f"pointing game {dense[2]:.3f} below 0.9"
    assert dense[0] >= 0.6 and dense[1] >= 0.6, (
        f"mIoU {dense[0]:.3f} (no background {dense[1]:.3f}) below 0.6"
    )
    assert dense[2] >= baseline[2] + 0.3
    assert dense[0] > baseline[0] + 0.3 and dense[1] > baseline[1] + 0.3
    assert dense[4] >= 0.8  # the dense loss leaves retrieval as good as the demo's
