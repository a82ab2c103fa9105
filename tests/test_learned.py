"""Learned quantizers (rq_vae, r3vae): training, encode seam, artifact, local build, DDP."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from semid_dist.errors import ArtifactError, ConfigError, FitDiverged
from semid_dist.io.store import TableStore
from semid_dist.pipeline import build
from semid_dist.quantize.acrq import fit_acrq_vae, split_sample
from semid_dist.quantize.artifact import ARRAYS_FILE, META_FILE
from semid_dist.quantize.divergence import check_diverged
from semid_dist.quantize.model import (
    KMeansQuantizer,
    LearnedQuantizer,
    as_quantizer,
    fit_learned,
    learned_params,
    load_quantizer,
    quantizer_files,
)
from semid_dist.quantize.r3vae import R3VAE
from semid_dist.quantize.rqvae import RQVAE, nearest_code
from semid_dist.quantize.training import TrainState, deterministic, train
from tests.conftest import clustered, small_config

LAYERS = (16, 8, 8)
SMALL = {"latent_dim": 8, "hidden_dims": (32,), "batch_size": 64}


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(1500, 12, seed=3)


@pytest.fixture(scope="module")
def fitted(data):
    """Both learned methods fitted once on the same data (6 epochs)."""
    out = {}
    for method in ("rq_vae", "r3vae"):
        params = learned_params(method, seed=0, epochs=6, **SMALL)
        out[method] = fit_learned(method, data, data[:400], LAYERS, params)
    return out


@pytest.mark.parametrize("method", ["rq_vae", "r3vae"])
def test_loss_decreases(fitted, method):
    _, stats = fitted[method]
    epochs = stats[0]["epochs"]
    assert len(epochs) == 6 and [s["layer"] for s in stats] == [0, 1, 2]
    assert epochs[-1]["reconstruction"] < 0.7 * epochs[0]["reconstruction"]
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert all(s["n"] == 1500 and s["k"] == k for s, k in zip(stats, LAYERS))


def _far_init_fit(x: np.ndarray, window: int) -> list[float]:
    """RQ-VAE whose first codebook starts far from every latent: without restart, one code
    takes every item; returns the last epoch's utilization per layer."""
    params = learned_params("rq_vae", seed=0, epochs=4, dead_code_window=window, **SMALL)
    with deterministic(0):
        model = RQVAE(x.shape[1], LAYERS, params)
        model.init_codebooks(torch.from_numpy(x[:400]))
        with torch.no_grad():
            far = torch.randn(LAYERS[0], params.latent_dim) + 50.0
            model.codebooks[0].copy_(far)
        stats = train(model, x, params)
    return [s["utilization"] for s in stats]


def test_dead_code_restart_prevents_collapse(data):
    collapsed = _far_init_fit(data, window=0)
    restarted = _far_init_fit(data, window=1)
    assert collapsed[0] <= 2 / LAYERS[0]
    assert restarted[0] >= 0.75


@pytest.mark.parametrize("method", ["rq_vae", "r3vae"])
def test_encode_equals_the_models_forward(fitted, data, method):
    model, _ = fitted[method]
    q = as_quantizer(model)
    assert isinstance(q, LearnedQuantizer) and q.sizes == LAYERS and q.dim == 12
    enc = q.encode(data, chunk_rows=len(data))
    with torch.no_grad():
        fwd = model(torch.from_numpy(data))
    assert enc.codes.dtype == np.int32 and enc.codes.shape == (len(data), 3)
    np.testing.assert_array_equal(enc.codes, fwd.codes.numpy())
    assert enc.sq_residual.dtype == np.float32
    # last column: reconstruction error in the input space, the model's own
    np.testing.assert_allclose(enc.qerr, fwd.recon.numpy(), rtol=1e-5, atol=1e-5)


def test_rq_vae_codes_are_nearest_codewords_of_the_latent_residual(fitted, data):
    model, _ = fitted["rq_vae"]
    enc = as_quantizer(model).encode(data, chunk_rows=len(data))
    with torch.no_grad():
        r = model.encoder(torch.from_numpy(data)).numpy().astype(np.float64)
    books = [cb.detach().numpy().astype(np.float64) for cb in model.codebooks]
    for layer, cb in enumerate(books):
        d2 = ((r[:, None, :] - cb[None]) ** 2).sum(axis=2)
        best = d2.min(axis=1)
        chosen = d2[np.arange(len(r)), enc.codes[:, layer]]
        np.testing.assert_allclose(chosen, best, rtol=1e-4, atol=1e-4)
        r = r - cb[enc.codes[:, layer]]
        if layer < len(books) - 1:
            np.testing.assert_allclose(enc.sq_residual[:, layer], (r ** 2).sum(axis=1),
                                       rtol=1e-3, atol=1e-3)


def test_r3vae_sid_is_the_per_layer_argmax_of_the_rating(fitted, data):
    model, _ = fitted["r3vae"]
    enc = as_quantizer(model).encode(data, chunk_rows=len(data))
    with torch.no_grad():
        ratings = model.ratings(torch.from_numpy(data))
    for layer, s in enumerate(ratings):
        s = s.numpy()
        top = s[np.arange(len(s)), enc.codes[:, layer]]
        np.testing.assert_allclose(top, s.max(axis=1), rtol=0, atol=1e-6)
    assert isinstance(model, R3VAE)


@pytest.mark.parametrize("method", ["rq_vae", "r3vae"])
def test_artifact_round_trip_gives_identical_codes(fitted, data, method):
    model, stats = fitted[method]
    files = quantizer_files(model, {"method": method, "training": stats})
    meta = json.loads(files[META_FILE])
    assert meta["model"]["method"] == method and meta["model"]["input_dim"] == 12
    assert any(k.startswith("param.encoder") for k in meta["arrays"])
    assert all(len(v["sha256"]) == 64 for v in meta["arrays"].values())
    loaded = load_quantizer(files)
    assert loaded.method == method and loaded.sizes == LAYERS
    a = as_quantizer(model).encode(data, chunk_rows=500)
    b = loaded.encode(data, chunk_rows=500)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.sq_residual, b.sq_residual)


def test_tampered_weight_is_refused(fitted):
    files = quantizer_files(fitted["rq_vae"][0], {"method": "rq_vae"})
    meta = json.loads(files[META_FILE])
    name = next(k for k in meta["arrays"] if k.startswith("param.decoder"))
    meta["arrays"][name]["sha256"] = "0" * 64
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_quantizer({**files, META_FILE: json.dumps(meta).encode()})
    assert ARRAYS_FILE in files


def test_rq_kmeans_artifact_loads_as_kmeans_quantizer():
    from semid_dist.quantize import encode_batch
    from semid_dist.quantize.artifact import artifact_files

    rng = np.random.default_rng(0)
    books = [rng.normal(size=(k, 5)).astype(np.float32) for k in (8, 4)]
    q = load_quantizer(artifact_files(books, {"method": "rq_kmeans"}))
    assert isinstance(q, KMeansQuantizer) and q.sizes == (8, 4) and q.dim == 5
    x = rng.normal(size=(50, 5)).astype(np.float32)
    np.testing.assert_array_equal(q.encode(x).codes, encode_batch(books, x).codes)


def test_same_seed_gives_identical_weights(data):
    params = learned_params("rq_vae", seed=5, epochs=2, **SMALL)
    a, _ = fit_learned("rq_vae", data, data[:400], LAYERS, params)
    b, _ = fit_learned("rq_vae", data, data[:400], LAYERS, params)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_learned_method_refuses_capacity_collisions(small_catalog, tmp_path):
    catalog, _ = small_catalog
    with pytest.raises(ConfigError, match="residual k-means quantizers only"):
        small_config(catalog, str(tmp_path), quantizer__method="rq_vae",
                     collisions__max_per_sid=2)
    with pytest.raises(ConfigError, match="fit.warm_start"):
        small_config(catalog, str(tmp_path), quantizer__method="r3vae", fit__warm_start="parent")
    with pytest.raises(ConfigError, match="hidden_dims"):
        small_config(catalog, str(tmp_path), quantizer__method="rq_vae",
                     quantizer__hidden_dims=[0])
    cfg = small_config(catalog, str(tmp_path), quantizer__method="r3vae")
    assert cfg.quantizer.lr is None and cfg.quantizer.hidden_dims == (256, 128)
    from semid_dist.engines.local import learned_config

    p = learned_config(cfg)
    assert (p.lr, p.weight_decay, p.lam, p.topk) == (5e-4, 1e-5, 0.01, 4)
    assert learned_config(small_config(catalog, str(tmp_path), quantizer__method="rq_vae",
                                       quantizer__lr=0.01)).lr == 0.01


def test_local_build_with_rq_vae_commits_a_reconciled_version(small_catalog, tmp_path):
    catalog, x = small_catalog
    root = str(tmp_path / "out")
    cfg = small_config(catalog, root, quantizer__method="rq_vae", quantizer__epochs=3,
                       quantizer__latent_dim=8, quantizer__hidden_dims=[32],
                       quantizer__batch_size=128)
    res = build(cfg, log=quiet)
    store = TableStore(root, "sids")
    assert store.latest() == res.version_id
    assert res.manifest["rows"] == {"input": len(x), "encoded": len(x), "rejected": 0}
    t = store.read_data().sort_by("item_id")
    assert t.num_rows == len(x)
    assert res.metrics["reconstruction"]["mse"] > 0
    assert [s["k"] for s in res.metrics["fit"]["layers"]] == [16, 8, 8]
    # the residual norms after L0 and L1 are the model's latent ones: said in the metrics
    # and marked in the report's table
    assert res.metrics["reconstruction"]["latent_layers"] == 2
    page = store.read_bytes(res.version_id, "report/report.html").decode("utf-8")
    assert all(f'<td class="l">L{i}*</td>' in page for i in (0, 1))
    assert '<td class="l">L2</td>' in page
    # the committed artifact rebuilds the model: re-encoding gives the committed codes
    blobs = {n: store.read_bytes(res.version_id, f"codebooks/{n}")
             for n in (ARRAYS_FILE, META_FILE)}
    q = load_quantizer(blobs)
    codes = np.array(t.column("codes").to_pylist(), dtype=np.int32)
    np.testing.assert_array_equal(q.encode(x, chunk_rows=cfg.encode.chunk_rows).codes, codes)
    np.testing.assert_allclose(t.column("qerr").to_numpy(),
                               q.encode(x, chunk_rows=cfg.encode.chunk_rows).qerr, rtol=1e-5)
    # encode.from_version reuses the learned artifact; its training keys do not matter
    again = build(small_config(catalog, root, quantizer__method="rq_vae",
                               quantizer__latent_dim=8, quantizer__hidden_dims=[32],
                               quantizer__epochs=99, encode__from_version=res.version_id),
                  log=quiet)
    assert store.read_data(again.version_id).sort_by("item_id").column("codes").equals(
        t.column("codes"))
    with pytest.raises(ConfigError, match="quantizer.method=rq_vae"):
        build(small_config(catalog, root, encode__from_version=res.version_id), log=quiet)
    # the model's shape does (the manifest recorded a config other than the model's)
    for key, given, held in (("latent_dim", 32, "8"), ("hidden_dims", [256, 128], "[32]")):
        keys = {"quantizer__latent_dim": 8, "quantizer__hidden_dims": [32],
                f"quantizer__{key}": given}
        with pytest.raises(ConfigError, match=re.escape(
                f"quantizer.{key}={str(given).replace(' ', '')} but version {res.version_id}'s "
                f"rq_vae model has {held}; set quantizer.{key}={held}")):
            build(small_config(catalog, root, quantizer__method="rq_vae",
                               encode__from_version=res.version_id, **keys), log=quiet)


def test_a_fit_that_diverges_is_a_named_error():
    """A loss that is not finite in any epoch, or a last epoch's reconstruction error over
    10 times the items' mean squared norm: the fit stops with the reason and the fix (a
    learning rate of 10 committed a table of one SID, relative error 25,929, status 0)."""
    params = learned_params("rq_vae", seed=0, lr=10.0)
    record = {"epoch": 3, "loss": 1.0, "reconstruction": 5.0}
    bound = {"items": 1.0, "untrained": 2.0}
    check_diverged(record, params, bound, last=True)  # 5 times: poor, not diverged
    check_diverged({**record, "reconstruction": 50.0}, params, bound, last=False)  # may recover
    with pytest.raises(FitDiverged, match=r"^the fit diverged \(epoch 3: loss 1, "
                       r"reconstruction error 50, 50 times the items' mean squared norm\); "
                       r"lower quantizer.lr \(now 10\), or scale the embeddings down "
                       r"\(items' mean squared norm 1\)$"):
        check_diverged({**record, "reconstruction": 50.0}, params, bound, last=True)
    # embeddings of small norm: measured against the untrained model's error too
    check_diverged({**record, "reconstruction": 15.0}, params, bound, last=True)
    for loss in (float("nan"), float("inf")):
        with pytest.raises(FitDiverged, match=r"epoch 3: loss (nan|inf), reconstruction error "
                                              r"5\); lower quantizer.lr"):
            check_diverged({**record, "loss": loss}, params, bound, last=False)


@pytest.mark.parametrize("method", ["rq_vae", "r3vae"])
def test_a_learning_rate_far_too_high_stops_the_build(small_catalog, tmp_path, method):
    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    cfg = small_config(catalog, root, quantizer__method=method, quantizer__layers=[16, 8],
                       quantizer__epochs=3, quantizer__lr=10.0, quantizer__latent_dim=8,
                       quantizer__hidden_dims=[32], quantizer__batch_size=64)
    with pytest.raises(FitDiverged, match="lower quantizer.lr"):
        build(cfg, log=quiet)
    assert TableStore(root, "sids").versions() == []


def test_a_barely_trained_quantizer_is_said_in_the_build_log(small_catalog, tmp_path):
    """One optimizer step (one epoch of a batch larger than the sample): the version is
    committed, and the log says its relative error shows the quantizer hardly learned."""
    catalog, _ = small_catalog
    lines: list[str] = []
    res = build(small_config(catalog, str(tmp_path / "out"), quantizer__method="rq_vae",
                             quantizer__layers=[16, 8], quantizer__epochs=1,
                             quantizer__batch_size=100_000, quantizer__latent_dim=8,
                             quantizer__hidden_dims=[32]), log=lines.append)
    rel = res.metrics["reconstruction"]["relative_error"]
    said = [m for m in lines if m.startswith("warning: relative error")]
    assert rel >= 0.9 and said == [f"warning: relative error {rel:.3f}: the learned quantizer "
                                   "reconstructs the items hardly better than zero vectors "
                                   "would (1.0); train it longer (quantizer.epochs, a smaller "
                                   "quantizer.batch_size) or with a higher quantizer.lr"]


def test_r3vae_settings_that_leave_nothing_to_code_are_refused():
    """A 1-dimensional latent (r3vae removes its projection on r: every item got one SID)
    and more codewords mixed than the smallest layer has (silently fewer)."""
    with pytest.raises(ConfigError, match=r"^quantizer.latent_dim=1: r3vae removes .* set "
                                          r"quantizer.latent_dim to 2 or more$"):
        small_config("cat", "root", quantizer__method="r3vae", quantizer__latent_dim=1)
    with pytest.raises(ConfigError, match=r"^quantizer.r3_topk=100 is more than the 8 "
                                          r"codewords of the smallest layer; set it to at "
                                          r"most 8$"):
        small_config("cat", "root", quantizer__method="r3vae", quantizer__r3_topk=100,
                     quantizer__layers=[16, 8])
    small_config("cat", "root", quantizer__method="rq_vae", quantizer__latent_dim=1,
                 quantizer__r3_topk=100)  # (keys rq_vae does not use)
    small_config("cat", "root", quantizer__method="r3vae", quantizer__r3_topk=100,
                 encode__from_version="latest")  # (a re-encode: the version's model rules)


def test_a_learned_fit_with_fewer_sample_rows_than_workers_is_refused(tmp_path):
    """A DDP worker with no rows runs fewer steps than the others (out of lock step): said
    before Ray Train starts."""
    from semid_dist.engines.ray_train import fit_on_ray_train
    from semid_dist.errors import InputError

    x = clustered(3, 4, seed=0)
    cfg = small_config("unused", str(tmp_path), engine="ray", quantizer__method="rq_vae",
                       quantizer__layers=[2, 2], fit__num_workers=4, fit__cpus_per_worker=0.5)
    with pytest.raises(InputError, match=r"^the fit sample holds 3 rows, fewer than "
                                         r"fit.num_workers=4; use fewer workers or a larger "
                                         r"fit.sample_size$"):
        fit_on_ray_train(x, x, cfg, quiet, f"file://{tmp_path}/staging")


@pytest.mark.engine
def test_a_diverged_ray_train_fit_is_the_same_named_error(ray_session, tmp_path):
    """Raised in Ray Train's workers, a named error was retried fit.max_failures times and
    ended the build with Ray Train's traceback; it reaches the driver as itself."""
    from semid_dist.engines.ray_train import fit_on_ray_train

    x = clustered(1500, 12, seed=3)
    cfg = small_config("unused", str(tmp_path), engine="ray", quantizer__method="rq_vae",
                       quantizer__layers=[16, 8], quantizer__epochs=3, quantizer__lr=10.0,
                       quantizer__latent_dim=8, quantizer__hidden_dims=[32],
                       quantizer__batch_size=64, fit__num_workers=2, fit__cpus_per_worker=0.5,
                       fit__max_failures=0)  # (a worker's error would end the fit otherwise)
    lines: list[str] = []
    with pytest.raises(FitDiverged, match=r"^the fit diverged \(epoch 2: .*lower quantizer.lr "
                                          r"\(now 10\)"):
        fit_on_ray_train(x, x[:400], cfg, lines.append, f"file://{tmp_path}/staging")
    # the epochs before it, relayed from the first worker as they end
    assert [m.split(":")[1] for m in lines if m.startswith("fit: epoch")] == [" epoch 0",
                                                                              " epoch 1"]


@pytest.mark.engine
@pytest.mark.parametrize("method", ["rq_vae", "r3vae"])
def test_ddp_two_workers_close_to_one(ray_session, tmp_path, method):
    """Ray Train DDP on 2 workers vs the same fit in one process (what 1 worker runs)."""
    from semid_dist.engines.local import learned_config
    from semid_dist.engines.ray_train import fit_on_ray_train

    x = clustered(2000, 10, seed=11)
    cfg = small_config("unused", str(tmp_path), engine="ray", quantizer__method=method,
                       quantizer__layers=[16, 8], quantizer__epochs=4,
                       quantizer__latent_dim=8, quantizer__hidden_dims=[32],
                       quantizer__batch_size=64, fit__num_workers=2, fit__cpus_per_worker=0.5)
    two, stats = fit_on_ray_train(x, x[:400], cfg, quiet, f"file://{tmp_path}/staging")
    one, _ = fit_learned(method, x, x[:400], (16, 8), learned_config(cfg))
    assert [s["n"] for s in stats] == [2000, 2000]  # all-reduced over both workers
    mse, util = {}, {}
    for name, model in (("one", one), ("two", two)):
        enc = as_quantizer(model).encode(x)
        mse[name] = float(enc.qerr.astype(np.float64).mean())
        util[name] = [len(np.unique(enc.codes[:, i])) / k for i, k in enumerate((16, 8))]
    assert mse["two"] == pytest.approx(mse["one"], rel=0.1)
    assert min(util["two"]) >= min(util["one"]) - 0.2


@pytest.mark.engine
def test_ddp_on_shards_of_unequal_size_keeps_the_workers_in_lock_step(ray_session, tmp_path):
    """301 rows on 2 workers (151 and 150) in batches of 1: one more step on one worker than
    on the other took DDP's collectives out of lock step (a gloo abort, Ray Train's retries,
    then a traceback); every worker runs as many steps as the smallest shard has rows."""
    from semid_dist.engines.ray_train import fit_on_ray_train

    x = clustered(301, 10, seed=5)
    cfg = small_config("unused", str(tmp_path), engine="ray", quantizer__method="rq_vae",
                       quantizer__layers=[16, 8], quantizer__epochs=1,
                       quantizer__latent_dim=8, quantizer__hidden_dims=[16],
                       quantizer__batch_size=1, fit__num_workers=2, fit__cpus_per_worker=0.5,
                       fit__max_failures=0)
    model, stats = fit_on_ray_train(x, x[:100], cfg, quiet, f"file://{tmp_path}/staging")
    assert [s["n"] for s in stats] == [301, 301]
    assert np.isfinite(as_quantizer(model).encode(x).qerr).all()


@pytest.mark.engine
def test_ray_data_encode_of_a_learned_version_matches_local(ray_session, small_catalog, tmp_path):
    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    learned = {"quantizer__method": "r3vae", "quantizer__epochs": 2, "quantizer__latent_dim": 8,
               "quantizer__hidden_dims": [32], "quantizer__batch_size": 128}
    local = build(small_config(catalog, root, **learned), log=quiet)
    ray = build(small_config(catalog, root, engine="ray", encode__from_version=local.version_id,
                             **learned), log=quiet)
    store = TableStore(root, "sids")
    a = store.read_data(local.version_id).sort_by("item_id")
    b = store.read_data(ray.version_id).sort_by("item_id")
    assert a.num_rows == 2400 and a.equals(b)
    with pytest.raises(ConfigError, match=re.escape(  # (r3vae's codewords mixed per layer)
            f"quantizer.r3_topk=2 but version {local.version_id}'s r3vae model has 4; set "
            "quantizer.r3_topk=4")):
        build(small_config(catalog, root, encode__from_version=local.version_id,
                           **{**learned, "quantizer__r3_topk": 2}), log=quiet)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", ["rq_vae", "r3vae"])
def test_learned_fit_on_gpu_trains(fitted, data, method):
    """A fit on the GPU under torch's deterministic algorithms (cuBLAS needs its fixed
    workspace there: every matrix product raised a RuntimeError without it) trains as the
    CPU's does: its loss falls and its error is near the CPU fit's."""
    params = learned_params(method, seed=0, epochs=6, **SMALL)
    model, stats = fit_learned(method, data, data[:400], LAYERS, params, device="cuda")
    epochs = stats[0]["epochs"]
    assert epochs[-1]["reconstruction"] < 0.7 * epochs[0]["reconstruction"]
    cpu = fitted[method][1][0]["epochs"][-1]["reconstruction"]
    assert epochs[-1]["reconstruction"] < 1.5 * cpu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", ["rq_vae", "r3vae"])
def test_learned_encode_on_gpu_matches_cpu(fitted, data, method):
    model, _ = fitted[method]
    files = quantizer_files(model, {"method": method})
    cpu = load_quantizer(files).encode(data)
    gpu = load_quantizer(files).encode(data, device="cuda")
    assert (cpu.codes == gpu.codes).all(axis=1).mean() >= 0.999  # fp32 ties may flip
    np.testing.assert_allclose(gpu.qerr, cpu.qerr, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["rq_vae", "r3vae"])
def test_resume_from_an_epoch_checkpoint_is_bit_identical(data, tmp_path, method):
    """A fit resumed from the checkpoint of epoch 1 (saved to disk and loaded back) ends
    with exactly the weights and history of the uninterrupted fit."""
    params = learned_params(method, seed=2, epochs=4, weight_decay=1e-3, **SMALL)
    saved = tmp_path / "epoch1"

    def keep(record, snapshot):
        if record["epoch"] == 1:
            saved.mkdir()
            snapshot().save(str(saved))

    whole, stats = fit_learned(method, data, data[:400], LAYERS, params, on_epoch=keep)
    state = TrainState.load(str(saved))
    assert state.epoch == 1 and len(state.history) == 2
    resumed, stats2 = fit_learned(method, data, data[:400], LAYERS, params, resume=state)
    for (ka, va), (kb, vb) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert stats2[0]["epochs"] == stats[0]["epochs"]


def test_bf16_mixed_precision_trains_and_codes_in_fp32(data):
    params = learned_params("rq_vae", seed=0, epochs=4, precision="bf16", **SMALL)
    model, stats = fit_learned("rq_vae", data, data[:400], LAYERS, params)
    epochs = stats[0]["epochs"]
    assert epochs[-1]["reconstruction"] < 0.8 * epochs[0]["reconstruction"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    # autocast really ran: the same fit in fp32 ends with other weights
    exact, _ = fit_learned("rq_vae", data, data[:400], LAYERS,
                           learned_params("rq_vae", seed=0, epochs=4, **SMALL))
    assert not torch.equal(exact.encoder[0].weight, model.encoder[0].weight)
    # the nearest codeword is scored in fp32 under autocast (bf16 scores would tie and flip)
    r = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    cb = r[:64] + 1e-3 * torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = nearest_code(r, cb)
    want = torch.cdist(r.double(), cb.double()).argmin(dim=1)
    assert torch.equal(got, want)
    enc = as_quantizer(model).encode(data)
    assert min(len(np.unique(enc.codes[:, i])) / k for i, k in enumerate(LAYERS)) > 0.5
    with pytest.raises(ConfigError, match="fit.precision=bf16 is for the learned"):
        small_config("cat", "root", fit__precision="bf16")


def test_acrq_on_rq_vae_keeps_anchors_and_resumes_in_stage_two(data, tmp_path):
    """ACRQ with gradient masking: stage 2's first a_l codewords are stage 1's head codebook,
    bit-identical after training with weight decay; resuming from a stage-2 checkpoint
    (stage 1 not rerun) ends with the uninterrupted weights."""
    head = np.random.default_rng(0).random(len(data)) < 0.4
    anchors = (6, 4, 4)
    params = learned_params("rq_vae", seed=1, epochs=3, weight_decay=1e-2, **SMALL)
    split = split_sample(data, head, LAYERS, anchors, seed=1)
    head_model, _ = fit_learned("rq_vae", data[head], split.head_seeds, anchors, params)
    saved, stages = tmp_path / "stage2", []

    def keep(record, snapshot):
        stages.append(record["stage"])
        if record["stage"] == 2 and record["epoch"] == 0:
            saved.mkdir()
            snapshot().save(str(saved))

    model, stats = fit_acrq_vae(data, head, LAYERS, anchors, split, params, on_epoch=keep)
    assert stages == [1, 1, 1, 2, 2, 2]
    for layer, a in enumerate(anchors):
        assert torch.equal(model.codebooks[layer][:a], head_model.codebooks[layer])
        assert stats[layer]["anchors"] == a and stats[layer]["k"] == LAYERS[layer]
    tail = as_quantizer(model).encode(data[~head]).codes
    assert (tail[:, 0] >= anchors[0]).mean() > 0.05  # the tail uses its extensions
    state = TrainState.load(str(saved))
    assert state.stage == 2
    again, again_stats = fit_acrq_vae(data, head, LAYERS, anchors, split, params, resume=state)
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), again.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert again_stats == stats  # stage 1's figures travel in the stage-2 checkpoint


def test_acrq_rq_vae_build_and_reuse(small_catalog, tmp_path):
    catalog, x = small_catalog
    root = str(tmp_path / "out")
    opts = {"quantizer__method": "acrq", "quantizer__acrq_base": "rq_vae",
            "quantizer__anchor_layers": [4, 4, 4], "input__popularity_column": "popularity",
            "quantizer__epochs": 2, "quantizer__latent_dim": 8, "quantizer__hidden_dims": [32],
            "quantizer__batch_size": 128}
    res = build(small_config(catalog, root, **opts), log=quiet)
    store = TableStore(root, "sids")
    blobs = {n: store.read_bytes(res.version_id, f"codebooks/{n}")
             for n in (ARRAYS_FILE, META_FILE)}
    q = load_quantizer(blobs)
    assert q.method == "acrq" and isinstance(q.module, RQVAE) and q.sizes == (16, 8, 8)
    codes = np.array(store.read_data().sort_by("item_id").column("codes").to_pylist())
    np.testing.assert_array_equal(q.encode(x).codes, codes)
    again = build(small_config(catalog, root, encode__from_version=res.version_id, **opts),
                  log=quiet)
    assert again.metrics["fit"]["codebooks_from"] == res.version_id
    # a learned parent's latent codebooks cannot warm-start residual k-means
    with pytest.raises(ConfigError, match="holds a learned acrq model"):
        build(small_config(catalog, root, fit__warm_start="parent"), log=quiet)


@pytest.mark.engine
def test_ray_train_worker_failure_resumes_acrq_rq_vae_from_epoch_checkpoint(
        ray_session, tmp_path, monkeypatch):
    """ACRQ on rq_vae with DDP on 2 Ray Train workers: a worker killed (SIGKILL) after an
    epoch, before reporting it, restarts the group (FailureConfig) from the last epoch
    checkpoint, and the fit ends with exactly the uninterrupted weights."""
    from semid_dist.engines.ray_train import fit_on_ray_train

    x = clustered(1600, 10, seed=14)
    head = np.random.default_rng(3).random(len(x)) < 0.5
    cfg = small_config("unused", str(tmp_path), engine="ray", quantizer__method="acrq",
                       quantizer__acrq_base="rq_vae", quantizer__layers=[16, 8],
                       quantizer__anchor_layers=[4, 4], input__popularity_column="popularity",
                       quantizer__epochs=3, quantizer__latent_dim=8,
                       quantizer__hidden_dims=[32], quantizer__batch_size=64,
                       fit__num_workers=2, fit__cpus_per_worker=0.5, fit__max_failures=2)
    split = split_sample(x, head, (16, 8), (4, 4), seed=cfg.seed)
    clean, stats = fit_on_ray_train(x, x[:400], cfg, quiet, f"file://{tmp_path}/clean",
                                    acrq=split)
    assert [s["anchors"] for s in stats] == [4, 4]
    marker = tmp_path / "worker-died"
    monkeypatch.setenv("SEMID_FAULT", "train_worker")
    monkeypatch.setenv("SEMID_FAULT_MARKER", str(marker))
    resumed, _ = fit_on_ray_train(x, x[:400], cfg, quiet, f"file://{tmp_path}/resumed",
                                  acrq=split)
    assert marker.exists()  # a worker really died
    for (ka, va), (kb, vb) in zip(clean.state_dict().items(), resumed.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
