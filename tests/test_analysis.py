"""The analyses of resnet_jax.analysis and their command line, on tiny nets.

Numbers are checked where the answer is known by construction: a residual net whose
branches start at zero passes dL/dx through unchanged up to the ReLU mask (and equals a
closed form at the last block); BN outputs normalised with their own batch have unit std;
the Table 1 report equals resnet_jax.summary. The degradation sweep is killed between two
nets and rerun, and must train only the missing one.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _closed_forms import closed_form, imagenet_stage_shapes
from _configs import ROOT

from resnet_jax import experiments, models
from resnet_jax.analysis import degradation, gradient_flow, probes, responses, table1
from resnet_jax.train import loop


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 6).astype(np.int32)


def _net(name, **overrides):
    model = models.build_model(name, **overrides)
    return model, probes.init_variables(model, seed=0)


def test_zero_init_residual_net_passes_the_gradient_through(batch):
    images, labels = batch
    model, variables = _net("cifar_resnet14", zero_init_last=True)  # 2 blocks per stage
    grads, inputs, _ = gradient_flow.block_input_gradients(model, variables, images, labels)
    names = list(grads)
    assert names == [f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2)]
    g = {k: np.asarray(v) for k, v in grads.items()}
    x = {k: np.asarray(v) for k, v in inputs.items()}
    for here, nxt in zip(names, names[1:]):
        mask = x[here] > 0
        if here.endswith("block1") and here != "stage1_block1":
            # Stride 2, option A: the input's gradient is the next one's first C channels
            # at the even positions, zero elsewhere.
            c = x[here].shape[-1]
            want = np.zeros_like(x[here])
            want[:, ::2, ::2, :] = g[nxt][..., :c]
        else:
            want = g[nxt]
        np.testing.assert_allclose(g[here], want * mask, rtol=1e-6, atol=1e-12)
    # Closed form at the last block: the block is relu(x), then mean pooling and the head,
    # so dL/dx = mask * (softmax - onehot) W^T / (H W N), broadcast over positions.
    logits = np.asarray(model.apply(variables, images, train=True, mutable=["batch_stats"])[0], np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1
    w = np.asarray(variables["params"]["head"]["kernel"], np.float64)
    last = x[names[-1]]
    h, wd = last.shape[1:3]
    want = (p @ w.T)[:, None, None, :] / (h * wd * len(labels)) * (last > 0)
    np.testing.assert_allclose(g[names[-1]], want, rtol=1e-4, atol=1e-9)
    norms = gradient_flow.gradient_norms(model, variables, images, labels)
    assert norms["first_over_last"] == pytest.approx(1.0, rel=1e-5)


def test_plain_net_changes_the_gradient_and_the_probe_is_the_true_gradient(batch):
    """The probe's dL/dx at a block input equals a central difference along a random
    direction v, and in a plain net every block rescales it.

    On the float64 path (`dtype='float64'` under `jax.enable_x64`), so that the check has
    room on any CPU (in float32 the quotient erred by 1.5% against a 3% tolerance). The
    error of (L(+eps v) - L(-eps v)) / 2 eps against <g, v> is bounded by:
      - the probe's gradient g, returned in float32 (block_input_gradients' probes are
        float32): each element rounded once, |error| <= 2^-24 sum |g_i v_i|;
      - round-off of the two float64 losses, each within 100 u |L| (u = 1.1e-16; measured
        about 1 u |L|), divided by 2 eps;
      - truncation, eps^2 |d^3L/dt^3| / 6 between ReLU kinks: no change was measured between
        eps = 1e-6 and 3e-6, so below 1e-11 of <g, v> at 1e-7;
      - a ReLU whose input changes sign within +-eps: measured, the nearest along v lies
        between eps = 3e-6 and 4e-6 (the error jumps from 1.7e-8 to 4.4e-5, 2.6e-3 at
        1e-5), so eps = 1e-7 is 30x inside the smooth piece; in float64 where the kinks lie
        cannot move by anything near that between CPUs.
    The bound is 1.6e-5 of <g, v>; measured 3.2e-8 (500x room). The next block's
    gradient along the same v differs by 68%, far outside.
    """
    images, labels = batch
    with jax.enable_x64(True):
        model, variables = _net("cifar_plain14", dtype="float64")
        grads, _, loss0 = gradient_flow.block_input_gradients(model, variables, images, labels)
        norms = [float(jnp.linalg.norm(v)) for v in grads.values()]
        ratios = np.array(norms[:-1]) / np.array(norms[1:])
        assert np.all(np.abs(ratios - 1) > 0.05), ratios  # every plain block rescales it
        name, after = "stage2_block2", "stage3_block1"
        v = np.random.default_rng(1).normal(size=grads[name].shape)  # float64
        zeros = {k: jnp.zeros(g.shape, jnp.float64) for k, g in grads.items()}

        @jax.jit
        def loss(eps):
            probes_ = dict(zeros, **{name: eps * jnp.asarray(v)})
            return gradient_flow._loss_with_probes(
                model, variables, jnp.asarray(images), jnp.asarray(labels), probes_
            )

        assert loss(0.0).dtype == jnp.float64  # the float64 path is really taken
        eps = 1e-7
        numeric = (float(loss(eps)) - float(loss(-eps))) / (2 * eps)
        g = np.asarray(grads[name], np.float64)
        exact = float(np.vdot(g, v))
        rounding = np.finfo(grads[name].dtype).eps / 2 * np.abs(g * v).sum()
        roundoff = 100 * np.finfo(np.float64).eps / 2 * abs(float(loss0)) / eps
        bound = rounding + roundoff + 1e-11 * abs(exact)
        assert abs(numeric - exact) <= bound, (numeric, exact, bound)
        # A probe that returned another block's gradient would be far outside.
        assert abs(float(np.vdot(np.asarray(grads[after], np.float64), v)) - exact) > 1e3 * bound


def test_bn_responses_with_own_batch_statistics_have_unit_std(batch):
    images, _ = batch
    model, variables = _net("cifar_resnet8")
    layers = responses.layer_responses(model, variables, images, batch_size=len(images), train=True)
    # The stem conv and two 3x3 convs in each of the three blocks, in network order.
    assert [layer["layer"] for layer in layers] == ["stem_bn"] + [
        f"stage{s}_block1/bn{i}" for s in (1, 2, 3) for i in (1, 2)
    ]
    for layer in layers:
        np.testing.assert_allclose(layer["channel_std"], 1.0, atol=1e-3)


def test_responses_match_flax_captured_bn_outputs_in_eval_mode(batch):
    images, _ = batch
    model, variables = _net("cifar_plain8")
    # Running statistics that are not the identity, so eval mode really rescales.
    rng = np.random.default_rng(2)
    variables = jax.tree.map(lambda a: a, variables)
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(
            rng.uniform(-0.2, 0.2, a.shape) if path[-1].key == "mean" else rng.uniform(0.5, 2.0, a.shape),
            jnp.float32,
        ),
        variables["batch_stats"],
    )
    layers = responses.layer_responses(model, variables, images, batch_size=4)  # 4 + 2 images
    _, state = model.apply(
        variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    for layer in layers:
        node = inter
        for part in layer["layer"].split("/"):
            node = node[part]
        y = np.asarray(node["__call__"][0], np.float64)
        want = y.reshape(-1, y.shape[-1]).std(axis=0)
        assert want.mean() > 0.01  # a layer that really responds
        np.testing.assert_allclose(layer["channel_std"], want, rtol=1e-4, atol=1e-6)
        assert layer["std"] == pytest.approx(want.mean(), rel=1e-4)


def test_table1_equals_the_independent_count():
    """Table 1 as the code computes it now and as the docs' figure records it, against the
    count from the papers' layer descriptions (tests/_closed_forms.py), not summarize()."""
    data = table1.table1(["resnet18", "plain34"])
    recorded = json.loads((ROOT / "docs" / "figures" / "table1.json").read_text())
    assert set(recorded["nets"]) == set(table1.IMAGENET_NETS)
    for name, row in [*data["nets"].items(), *recorded["nets"].items()]:
        assert (row["params"], row["flops"]) == closed_form(name), name
        assert row["stages"] == imagenet_stage_shapes(name), name
        assert row["paper_flops_1e9"] == table1.PAPER_FLOPS.get(name)
        if row["paper_flops_1e9"] is not None:  # the paper's rounded figure (3.86 for its 3.8)
            assert abs(row["flops"] / 1e9 / row["paper_flops_1e9"] - 1) < 0.03, name
    md = table1.markdown_table(data)
    assert "| resnet18 | 11,689,512 | 1.81 | 1.8 |" in md


def test_bad_depth_is_named():
    with pytest.raises(ValueError, match="depth 21"):
        degradation.net_names([20, 21])
    assert degradation.net_names([20, 56]) == ["plain20", "resnet20", "plain56", "resnet56"]


def test_shortening_keeps_the_recipe_shape():
    config = experiments.load_config_file(experiments._PACKAGED_CONFIG, "resnet110")
    degradation.Shortening(steps=640, batch=64).apply(config)
    assert config.schedule.total_steps == 640
    assert tuple(config.schedule.boundaries) == (320, 480)
    assert config.schedule.warmup_steps == 4  # 400 of 64k
    assert config.optimizer.learning_rate == pytest.approx(0.05)
    assert config.reference_batch_size == config.batch_size == 64
    for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        assert config[field] % config.steps_per_dispatch == 0


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cifar_dir):
    """A degradation sweep (plain-8, ResNet-8) killed between the two nets, then rerun."""
    root = tmp_path_factory.mktemp("sweep")
    argv = [
        "degradation",
        "--depths",
        "8",
        "--steps",
        "8",
        "--batch",
        "32",
        "--train-subset",
        "256",
        "--eval-subset",
        "100",
        "--eval-every",
        "4",
        "--log-every",
        "4",
        "--data-dir",
        str(cifar_dir),
        "--workdir",
        str(root / "runs"),
        "--out",
        str(root / "out"),
    ]
    real = loop.train_and_evaluate
    calls = []

    def killed_at_resnet(config, workdir):
        calls.append(config.model.name)
        if config.model.name == "cifar_resnet8":
            raise KeyboardInterrupt  # killed after plain-8 finished, before ResNet-8 started
        return real(config, workdir)

    def recording(config, workdir):
        calls.append(config.model.name)
        return real(config, workdir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "train_and_evaluate", killed_at_resnet)
        with pytest.raises(KeyboardInterrupt):
            experiments.main(argv)
        first = list(calls)
        plain_results = (root / "runs" / "plain8" / "results.json").read_bytes()
        resnet_done_before = (root / "runs" / "resnet8" / "results.json").exists()
        calls.clear()
        mp.setattr(loop, "train_and_evaluate", recording)
        rc = experiments.main(argv)
    return {
        "root": root,
        "first": first,
        "second": list(calls),
        "rc": rc,
        "plain_results": plain_results,
        "resnet_done_before": resnet_done_before,
    }


def test_killed_sweep_trains_only_what_is_missing(sweep):
    assert sweep["first"] == ["cifar_plain8", "cifar_resnet8"]
    assert not sweep["resnet_done_before"]
    assert sweep["second"] == ["cifar_resnet8"]  # plain-8 was not trained again
    runs = sweep["root"] / "runs"
    assert (runs / "plain8" / "results.json").read_bytes() == sweep["plain_results"]
    assert sweep["rc"] == 0


def test_degradation_writes_png_json_and_table(sweep):
    out = sweep["root"] / "out"
    data = json.loads((out / "degradation.json").read_text())
    for name in ("plain8", "resnet8"):
        results = json.loads((sweep["root"] / "runs" / name / "results.json").read_text())
        run = data["runs"][name]
        assert run["final_error"] == results["final_error"]
        assert [s for s, _ in run["test"]] == [4, 8]
        assert [s for s, _ in run["train"]] == [4, 8]
    assert (out / "degradation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "degradation.md").read_text()
    assert f"| 8 | {100 * data['runs']['plain8']['final_error']:.2f} | " in md


def test_layer_responses_and_gradient_flow_from_the_command_line(sweep, cifar_dir, tmp_path):
    runs = str(sweep["root"] / "runs")
    assert (
        experiments.main(
            [
                "layer-responses",
                "--workdirs",
                runs,
                "--init",
                "cifar_resnet8",
                "--images",
                "100",
                "--batch",
                "50",
                "--data-dir",
                str(cifar_dir),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "layer_responses.json").read_text())
    assert set(data["nets"]) == {"plain-8 (step 8)", "ResNet-8 (step 8)", "resnet8 (init)"}
    assert all(len(net["layers"]) == 7 for net in data["nets"].values())
    assert (tmp_path / "layer_responses.png").stat().st_size > 1000

    assert (
        experiments.main(
            [
                "gradient-flow",
                "--depths",
                "8",
                "--variants",
                "plain",
                "resnet_zero_init",
                "--images",
                "8",
                "--workdirs",
                runs,
                "--data-dir",
                str(cifar_dir),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "gradient_flow.json").read_text())
    assert set(data["nets"]) == {"plain-8", "ResNet-8 zero-init", "plain-8 (step 8)", "ResNet-8 (step 8)"}
    assert data["nets"]["ResNet-8 zero-init"]["first_over_last"] == pytest.approx(1.0, rel=1e-5)
    assert (tmp_path / "gradient_flow.png").stat().st_size > 1000

    assert experiments.main(["table1", "--nets", "resnet18", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "table1.json").read_text())["nets"]["resnet18"]["paper_flops_1e9"] == 1.8
