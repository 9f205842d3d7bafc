import numpy as np
import pytest

from paper_kd import physics
from paper_kd.data import pipeline
from paper_kd.data.format import JetFormatError, JetWriter, read_jets, split_path, write_jets


def synthetic_jets(rng, n_jets, n_max=96):
    """Massless showers boosted to about 600 GeV: top jets heavier (175 GeV), wider, fuller."""
    label = (np.arange(n_jets) % 2).astype(np.int8)
    rng.shuffle(label)
    multiplicity = np.where(label == 1, rng.normal(60, 12, n_jets), rng.normal(32, 9, n_jets))
    multiplicity = np.clip(multiplicity.round(), 2, n_max).astype(int)
    target_mass = np.where(label == 1, rng.normal(175, 12, n_jets), rng.normal(60, 20, n_jets))
    target_mass = np.clip(target_mass, 10, None)

    direction = rng.normal(size=(n_jets, n_max, 3))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    energy = rng.exponential(1.0, size=(n_jets, n_max, 1))
    p4 = np.concatenate([energy, energy * direction], axis=-1)
    p4[np.arange(n_max)[None, :] >= multiplicity[:, None]] = 0.0
    p4 *= (target_mass / physics.mass(p4.sum(axis=1)))[:, None, None]
    # Boost each jet to about 600 GeV of momentum: heavier jets come out wider.
    gamma = np.sqrt(1.0 + (600.0 / target_mass) ** 2)
    p4 = physics.boost(p4, np.sqrt(1.0 - 1.0 / gamma**2)[:, None], "x")
    p4[..., 0] = np.linalg.norm(p4[..., 1:], axis=-1)  # massless again after rounding

    order = np.argsort(-physics.pt(p4), axis=1, kind="stable")
    p4 = np.take_along_axis(p4, order[..., None], axis=1).astype(np.float32)
    return p4, label, multiplicity


@pytest.fixture(scope="module")
def jet_file(tmp_path_factory):
    p4, label, multiplicity = synthetic_jets(np.random.default_rng(0), 1000)
    path = write_jets(tmp_path_factory.mktemp("jets") / "train.h5", p4, label)
    return path, p4, label, multiplicity


def batches_of(dataset):
    return [(inputs["p4"].numpy(), inputs["mask"].numpy(), y.numpy()) for inputs, y in dataset]


def jet_ids(batches):
    """The leading constituent's energy identifies a jet (all distinct in the fixture)."""
    return np.concatenate([p4[:, 0, 0] for p4, _, _ in batches])


def test_unshuffled_batches_are_the_file_trimmed_per_batch(jet_file):
    path, p4, label, multiplicity = jet_file
    dataset = pipeline.make_dataset(path, 300)
    assert int(dataset.cardinality()) == 4
    batches = batches_of(dataset)
    assert [len(y) for _, _, y in batches] == [300, 300, 300, 100]
    for k, (batch_p4, mask, y) in enumerate(batches):
        rows = slice(300 * k, 300 * (k + 1))
        width = multiplicity[rows].max()
        assert batch_p4.dtype == np.float32 and mask.dtype == bool and y.dtype == np.int32
        assert batch_p4.shape == (len(y), width, 4)
        np.testing.assert_array_equal(batch_p4, p4[rows, :width])
        np.testing.assert_array_equal(mask.sum(axis=1), multiplicity[rows])
        np.testing.assert_array_equal(y, label[rows])
        assert np.all(batch_p4[~mask] == 0) and np.all(batch_p4[mask][:, 0] > 0)


def test_n_max_keeps_hardest_and_drop_remainder_gives_static_batches(jet_file):
    path, p4, _, multiplicity = jet_file
    dataset = pipeline.make_dataset(path, 128, n_max=20, drop_remainder=True)
    assert dataset.element_spec[1].shape.as_list() == [128]
    assert int(dataset.cardinality()) == 1000 // 128
    batches = batches_of(dataset)
    assert len(batches) == 1000 // 128
    first_p4, first_mask, _ = batches[0]
    assert first_p4.shape == (128, 20, 4)
    np.testing.assert_array_equal(first_p4, p4[:128, :20])
    np.testing.assert_array_equal(first_mask.sum(axis=1), np.minimum(multiplicity[:128], 20))


def test_seeded_shuffle_is_reproducible_and_reshuffles_each_epoch(jet_file):
    path, p4, _, _ = jet_file
    first = pipeline.make_dataset(path, 64, shuffle=True, seed=3)
    again = pipeline.make_dataset(path, 64, shuffle=True, seed=3)
    other = pipeline.make_dataset(path, 64, shuffle=True, seed=4)

    epoch0, epoch1 = jet_ids(batches_of(first)), jet_ids(batches_of(first))
    np.testing.assert_array_equal(epoch0, jet_ids(batches_of(again)))
    np.testing.assert_array_equal(epoch1, jet_ids(batches_of(again)))
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, jet_ids(batches_of(other)))
    for ids in (epoch0, epoch1):
        np.testing.assert_array_equal(np.sort(ids), np.sort(p4[:, 0, 0]))
    assert not np.array_equal(epoch0, p4[:, 0, 0])


def test_repeat_continues_with_the_next_epochs_shuffle(jet_file):
    path, _, _, _ = jet_file
    repeated = pipeline.make_dataset(path, 100, shuffle=True, seed=5, repeat=True)
    ids = jet_ids(batches_of(repeated.take(20)))
    single = pipeline.make_dataset(path, 100, shuffle=True, seed=5)
    expected = np.concatenate([jet_ids(batches_of(single)), jet_ids(batches_of(single))])
    np.testing.assert_array_equal(ids, expected)


@pytest.mark.parametrize("compression", ["gzip", None])
def test_streamed_file_gives_every_jet_once_in_full_batches(
    jet_file, monkeypatch, tmp_path, compression
):
    _, p4, label, multiplicity = jet_file
    # Without compression the chunks are read by h5py instead of the thread pool.
    path = tmp_path / "train.h5"
    with JetWriter(path, p4.shape[1], compression=compression) as writer:
        writer.append(p4, label)
    assert pipeline._P4Reader(path, 10).parallel == (compression == "gzip")
    monkeypatch.setattr(pipeline, "READ_BLOCK_JETS", 96)
    monkeypatch.setattr(pipeline, "READ_WINDOW_BLOCKS", 2)

    def streamed():
        return batches_of(
            pipeline.make_dataset(path, 50, shuffle=True, seed=1, bucket=True, in_memory=False)
        )

    batches = streamed()
    assert [len(y) for _, _, y in batches] == [50] * 20
    ids = jet_ids(batches)
    order = np.argsort(p4[:, 0, 0])
    position = order[np.searchsorted(p4[order, 0, 0], ids)]
    np.testing.assert_array_equal(np.sort(position), np.arange(1000))
    np.testing.assert_array_equal(np.concatenate([y for _, _, y in batches]), label[position])
    start = 0
    for batch_p4, mask, _ in batches:
        rows = position[start : start + len(mask)]
        start += len(mask)
        np.testing.assert_array_equal(batch_p4, p4[rows, : batch_p4.shape[1]])
        np.testing.assert_array_equal(mask.sum(axis=1), multiplicity[rows])
        assert batch_p4.shape[1] == multiplicity[rows].max()
    np.testing.assert_array_equal(ids, jet_ids(streamed()))


def naive_buckets(n_constituents, batch_size, rng, window_batches):
    """Sort each shuffled window by multiplicity, both classes together."""
    order = rng.permutation(len(n_constituents))
    batches = []
    for start in range(0, len(order), window_batches * batch_size):
        window = order[start : start + window_batches * batch_size]
        window = window[np.argsort(n_constituents[window], kind="stable")]
        batches += list(window.reshape(-1, batch_size))
    return batches


BUCKET_JETS, BUCKET_BATCH = 32 * 64 * 4, 64


def class_multiplicities(seed, top, qcd, n_jets=BUCKET_JETS):
    """Balanced labels and multiplicities drawn from normals ``(mean, sd)`` per class."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n_jets) < 0.5).astype(np.int8)
    multiplicity = np.where(label == 1, rng.normal(*top, n_jets), rng.normal(*qcd, n_jets))
    return label, np.clip(multiplicity.round(), 1, 200).astype(np.int32)


def test_bucketing_keeps_class_balance_and_cuts_padding():
    n_jets, batch_size = BUCKET_JETS, BUCKET_BATCH
    label, multiplicity = class_multiplicities(0, top=(60, 12), qcd=(32, 9))
    global_fraction = label.mean()

    def summary(batches):
        deviation = np.mean([abs(label[b].mean() - global_fraction) for b in batches])
        padded = np.sum([len(b) * multiplicity[b].max() for b in batches])
        return deviation, padded

    plain, _ = pipeline.plan_batches(multiplicity, label, batch_size, rng=np.random.default_rng(1))
    bucketed, leftover = pipeline.plan_batches(
        multiplicity, label, batch_size, rng=np.random.default_rng(1), bucket=True
    )
    naive = naive_buckets(multiplicity, batch_size, np.random.default_rng(1), 32)
    assert len(leftover) == 0 and all(len(b) == batch_size for b in bucketed)
    np.testing.assert_array_equal(np.sort(np.concatenate(bucketed)), np.arange(n_jets))

    plain_deviation, plain_padded = summary(plain)
    bucket_deviation, bucket_padded = summary(bucketed)
    naive_deviation, naive_padded = summary(naive)
    # Balanced buckets: class fraction within one jet of the window's, unlike naive sorting.
    assert bucket_deviation < 0.02 < plain_deviation < 0.1
    assert naive_deviation > 0.3
    assert bucket_padded < 0.85 * plain_padded
    assert naive_padded < bucket_padded


def test_bucketing_leaves_no_within_batch_multiplicity_cue():
    # Realistic overlap: top jets have more constituents, but not always.
    batch_size = BUCKET_BATCH
    label, multiplicity = class_multiplicities(5, top=(64, 14), qcd=(50, 14))

    def within_batch_auc(batches):
        """Mean over batches of P(a top jet has more constituents than a QCD jet)."""
        values = []
        for index in batches:
            top, qcd = (
                multiplicity[index][label[index] == 1],
                multiplicity[index][label[index] == 0],
            )
            greater = (top[:, None] > qcd[None, :]).mean() + 0.5 * (
                top[:, None] == qcd[None, :]
            ).mean()
            values.append(greater)
        return np.mean(values)

    plain, _ = pipeline.plan_batches(multiplicity, label, batch_size, rng=np.random.default_rng(1))
    bucketed, _ = pipeline.plan_batches(
        multiplicity, label, batch_size, rng=np.random.default_rng(1), bucket=True
    )
    natural = within_batch_auc(plain)
    assert 0.7 < natural < 0.8
    # Pairing equal ranks of the two classes would give ~1: every batch's top jets above
    # its QCD jets. Random ranks keep the dataset's overlap on average.
    assert abs(within_batch_auc(bucketed) - natural) < 0.05


def test_assemble_batch_pads_widths_to_a_multiple():
    n_constituents = np.array([3, 10, 7])
    jets = {
        "p4": np.ones((3, 12, 4), np.float32),
        "n_constituents": n_constituents,
        "label": np.array([0, 1, 0]),
    }
    p4, mask, label = pipeline.assemble_batch(jets, np.arange(3))
    assert p4.shape == (3, 10, 4)
    p4, mask, label = pipeline.assemble_batch(jets, np.arange(3), pad_multiple=8)
    # 10 rounds up to 16, but never past the 12 stored slots.
    assert p4.shape == (3, 12, 4) and mask.shape == (3, 12)
    np.testing.assert_array_equal(mask.sum(axis=1), n_constituents)
    p4, mask, label = pipeline.assemble_batch(jets, np.array([0, 2]), pad_multiple=4)
    assert p4.shape == (2, 8, 4)


def tiny_mass_model():
    import keras

    p4_in = keras.Input((None, 4), name="p4")
    mask_in = keras.Input((None,), dtype="bool", name="mask")
    weights = keras.ops.expand_dims(keras.ops.cast(mask_in, "float32"), -1)
    jet = keras.ops.sum(p4_in * weights, axis=1)  # [batch, 4]
    mass2 = jet[:, 0] ** 2 - keras.ops.sum(jet[:, 1:] ** 2, axis=-1)
    count = keras.ops.sum(weights, axis=(1, 2))
    features = keras.ops.stack(
        [keras.ops.log(keras.ops.maximum(mass2, 1.0)) / 10.0, count / 50.0], axis=-1
    )
    hidden = keras.layers.Dense(8, activation="relu")(features)
    logits = keras.layers.Dense(2)(hidden)
    model = keras.Model({"p4": p4_in, "mask": mask_in}, logits)
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def test_training_with_and_without_bucketing_reaches_the_same_accuracy(tmp_path):
    """Well-separated classes, a model without batch statistics: see the pipeline's limitation."""
    import keras

    rng = np.random.default_rng(2)
    p4, label, _ = synthetic_jets(rng, 3000)
    train = write_jets(tmp_path / "train.h5", p4[:2400], label[:2400])
    val = write_jets(tmp_path / "val.h5", p4[2400:], label[2400:])
    val_inputs, val_label = pipeline.load_arrays(val)

    accuracy = {}
    for bucket in (False, True):
        keras.utils.set_random_seed(0)
        model = tiny_mass_model()
        dataset = pipeline.make_dataset(train, 64, shuffle=True, seed=0, bucket=bucket)
        model.fit(dataset, epochs=6, verbose=0, shuffle=False)  # the dataset shuffles
        logits = model.predict(val_inputs, batch_size=600, verbose=0)
        accuracy[bucket] = np.mean(np.argmax(logits, axis=1) == val_label)
    assert accuracy[False] > 0.9 and accuracy[True] > 0.9
    assert abs(accuracy[True] - accuracy[False]) < 0.03


def test_load_arrays_matches_the_file(jet_file):
    path, p4, label, multiplicity = jet_file
    inputs, labels = pipeline.load_arrays(path, n_max=50, max_jets=300)
    width = min(multiplicity[:300].max(), 50)
    assert inputs["p4"].shape == (300, width, 4) and labels.dtype == np.int32
    np.testing.assert_array_equal(inputs["p4"], p4[:300, :width])
    np.testing.assert_array_equal(inputs["mask"].sum(axis=1), np.minimum(multiplicity[:300], 50))
    np.testing.assert_array_equal(labels, label[:300])
    np.testing.assert_array_equal(read_jets(path, 0, 300, ("label",))["label"], labels)


def test_bad_paths_name_the_file(tmp_path):
    with pytest.raises(JetFormatError, match="no such file"):
        pipeline.make_dataset(tmp_path / "missing.h5", 8)
    with pytest.raises(JetFormatError, match="is a folder"):
        pipeline.load_arrays(tmp_path)


def test_throughput_helper_reports_jets_per_second(jet_file):
    path, _, _, _ = jet_file
    result = pipeline.measure_throughput(path, 100, shuffle=True, bucket=True)
    assert result["jets"] == 900 and result["batches"] == 9
    assert result["jets_per_s"] > 0 and 2 <= result["mean_width"] <= 96


def test_a_file_in_memory_is_read_once_until_it_changes(tmp_path):
    p4, label, _ = synthetic_jets(np.random.default_rng(4), 40, n_max=8)
    path = write_jets(tmp_path / "val.h5", p4, label)
    first = pipeline._open_source(path)
    assert pipeline._open_source(path) is first and first.cached is not None
    assert pipeline._open_source(path, max_jets=10) is not first

    write_jets(path, p4[::-1], label[::-1])
    inputs, labels = pipeline.load_arrays(path)
    np.testing.assert_array_equal(labels, label[::-1])
    np.testing.assert_array_equal(inputs["p4"][0], p4[-1, : inputs["p4"].shape[1]])


def test_generated_jets_stream_in_balanced_buckets(pythia_jets_dir):
    path = split_path(pythia_jets_dir, "train")
    jets = read_jets(path)
    top_fraction = jets["label"].mean()
    dataset = pipeline.make_dataset(path, 20, shuffle=True, seed=2, bucket=True, in_memory=False)
    batches = batches_of(dataset)

    assert sum(len(y) for _, _, y in batches) == len(jets["label"])
    for p4, mask, y in batches:
        assert abs(y.mean() - top_fraction) <= 1 / len(y) + 1e-9
        assert p4.shape[1] == mask.sum(axis=1).max()
        # Real constituents are exactly the non-zero ones, pT-ordered.
        np.testing.assert_array_equal(mask, np.any(p4 != 0, axis=-1))
        pt = np.hypot(p4[..., 1], p4[..., 2])
        assert np.all(np.diff(np.where(mask, pt, 0), axis=1) <= 0)
    widths = np.sort(np.concatenate([m.sum(axis=1) for _, m, _ in batches]))
    np.testing.assert_array_equal(widths, np.sort(jets["n_constituents"]))


def test_streaming_a_file_sorted_by_class_warns(jet_file, tmp_path, monkeypatch, caplog):
    _, p4, label, _ = jet_file
    order = np.argsort(label, kind="stable")
    path = write_jets(tmp_path / "sorted.h5", p4[order], label[order])
    monkeypatch.setattr(pipeline, "READ_BLOCK_JETS", 128)
    pipeline.make_dataset(path, 32, shuffle=True, in_memory=False)
    assert "the top fraction varies from 0.00 to 1.00 between blocks of 128 jets" in caplog.text
    caplog.clear()
    pipeline.make_dataset(jet_file[0], 32, shuffle=True, in_memory=False)
    assert "top fraction varies" not in caplog.text
