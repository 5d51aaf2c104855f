"""Tests of resnet_jax.summary: Table 1 FLOPs, per-stage rows, the command line."""

import json

import pytest

from resnet_jax import summary
from resnet_jax.models import build_model


@pytest.fixture(scope="module")
def resnet18_summary():
    return summary.summarize(build_model("resnet18"))


@pytest.mark.parametrize("depth,paper_gflops", [(18, 1.8), (34, 3.6), (50, 3.8), (101, 7.6), (152, 11.3)])
def test_table1_flops_within_3_percent(depth, paper_gflops):
    got = summary.summarize(build_model(f"resnet{depth}"))
    assert got["image_size"] == 224
    assert abs(got["flops"] / 1e9 - paper_gflops) / paper_gflops < 0.03


def test_resnet18_rows_match_table1(resnet18_summary):
    rows = resnet18_summary["stages"]
    assert list(rows) == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    assert [rows[k]["shape"] for k in rows] == [
        [112, 112, 64],
        [56, 56, 64],
        [28, 28, 128],
        [14, 14, 256],
        [7, 7, 512],
        [1000],
    ]
    assert rows["stem"]["flops"] == 112 * 112 * 64 * 7 * 7 * 3
    assert rows["stage1"]["flops"] == 4 * 56 * 56 * 64 * 9 * 64
    assert rows["head"] == {"shape": [1000], "params": 513_000, "flops": 512_000}
    assert sum(r["params"] for r in rows.values()) == resnet18_summary["params"] == 11_689_512
    assert sum(r["flops"] for r in rows.values()) == resnet18_summary["flops"]


def cifar_basic_flops(n, num_classes=10):
    """Closed-form multiply-adds of a CIFAR 6n+2 net with option A shortcuts at 32x32."""
    total = 32 * 32 * 16 * 9 * 3
    cin = 16
    for side, width in ((32, 16), (16, 32), (8, 64)):
        per_position = 9 * cin * width + (2 * n - 1) * 9 * width * width
        total += side * side * per_position
        cin = width
    return total + 64 * num_classes


def test_cifar_resnet20_flops():
    got = summary.summarize(build_model("cifar_resnet20"))
    assert got["image_size"] == 32 and got["params"] == 269_722
    assert got["flops"] == cifar_basic_flops(3)
    assert abs(got["flops"] / 41e6 - 1) < 0.03  # "ResNet-20: 41M FLOPs"


def test_v15_stride_on_3x3_costs_more_and_matches_torchvision():
    got = summary.summarize(build_model("resnet50", stride_on_3x3=True))
    assert abs(got["flops"] / 4.09e9 - 1) < 0.01  # torchvision's reported 4.09 GFLOPs


def test_flops_scale_with_image_size():
    small = summary.summarize(build_model("cifar_resnet8"), 16)
    large = summary.summarize(build_model("cifar_resnet8"), 64)
    head = 64 * 10
    assert large["flops"] - head == 16 * (small["flops"] - head)
    assert large["stages"]["stage3"]["shape"] == [16, 16, 64]


def test_cli_json_last_line(capsys):
    assert (
        summary.main(
            ["resnet18", "--json", "--image-size", "160", "--set", "shortcut=C", "--set", "num_classes=5"]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert report["model"] == "resnet18" and report["image_size"] == 160
    # Option C adds a 1x1 projection + BN to the five blocks that option B leaves as identity.
    added = 2 * (64 * 64 + 128) + (128 * 128 + 256) + (256 * 256 + 512) + (512 * 512 + 1024)
    assert report["params"] == 11_689_512 - 513_000 + (512 * 5 + 5) + added
    assert report["stages"]["stage4"]["shape"] == [5, 5, 512]
    assert report["stages"]["head"]["shape"] == [5]
    assert isinstance(report["flops"], int) and report["flops"] > 0


def test_cli_table_for_humans(capsys):
    assert summary.main(["cifar_resnet20"]) == 0
    out = capsys.readouterr().out
    assert "269,722" in out and "8x8x64" in out and "stage3" in out


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit) as exc:
        summary.main(["cifar_resnet21"])
    assert exc.value.code == 2
    assert "depth 21 is not 6n+2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        summary.main(["resnet18", "--set", "shortcut"])
    assert "key=value" in capsys.readouterr().err


def test_parse_value():
    assert summary.parse_value("True") is True and summary.parse_value("false") is False
    assert summary.parse_value("none") is None
    assert summary.parse_value("0.5") == 0.5 and summary.parse_value("32") == 32
    assert summary.parse_value("1,2,3") == (1, 2, 3)
    assert summary.parse_value("bfloat16") == "bfloat16"
    assert summary.parse_overrides(["dtype=float16", "ghost_batch_size=32"]) == {
        "dtype": "float16",
        "ghost_batch_size": 32,
    }
