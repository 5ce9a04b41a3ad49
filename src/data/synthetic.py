"""Synthetic data files in exactly the MulT or the MMSA layout, with real label signal and an optional shortcut.

The real pickles can't be downloaded everywhere, so tests and the demo run on files written here.
MulT layout (data_format "mult"): a dict of train/valid/test splits; keys text/audio/vision/labels (and
`id` for MOSEI/MOSI); float64 arrays except MOSI's float32 text; the real feature dimensions and
sequence lengths; zero left-padding of varying length; `-inf` entries in audio; labels as IEMOCAP
one-hot (absent, present) pairs or MOSEI/MOSI (N, 1, 1) scores.
MMSA layout (data_format "mmsa", MOSI/MOSEI/SIMS): the same splits (plus any `extra_splits`, e.g.
test_ood, drawn as test is); float32 text (BERT-sized, 768), audio and vision of MMSA's sizes, padded
at the end; `audio_lengths`/`vision_lengths` (unaligned files) as lists of ints; `regression_labels`
(N,) and, for SIMS, `regression_labels_T/_A/_V`: the label each modality's signal was drawn from;
`id` ('video$_$clip') and `raw_text` as arrays of str; `-inf` in audio. The raw text is a few filler
words and a sentiment word of the label the text features were drawn from (plus a cue word of the
shortcut's label when the shortcut is planted in text), drawn from `seed` as well.

How the features depend on the labels:
- Each sample gets a label (one of the four emotions for IEMOCAP, a sentiment score in [-3, 3]
  quantised to thirds for MOSEI/MOSI) and from it a small latent vector (the emotion one-hot; or
  the score and its magnitude).
- Every modality carries genuine signal: at a random subset of its non-padded steps, the latent
  times a fixed modality-specific orthonormal direction matrix, scaled by `signal`, is added to
  unit Gaussian noise. Each modality "sees" the true label only with some probability (text most
  often, vision least) and otherwise a random one, so no modality alone is perfect and combining
  them helps. `signal=0` leaves pure noise.
- A planted bias (`bias_modality`, `bias_strength`): the chosen modality gets an extra, clean
  shortcut along directions orthogonal to its genuine ones, added at every non-padded step. In
  train and valid the shortcut encodes the true label with probability `bias_strength` (else a
  random label); in test it is always drawn independently of the label. A model that leans on the
  shortcut scores well on valid and drops on test; `shortcut_directions()` returns the directions
  so an analysis can measure how much of it a model uses.

Everything is drawn from `seed`: the same arguments write a byte-identical file, and files that
differ only in the planted bias share labels, genuine signal and noise.
"""
from __future__ import annotations

import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np

from ..atomic import remove_stale_temporaries, replacing
from .formats import SPLIT_NAME, UNIMODAL_KEYS
from ..modalities import LABEL_KEYS
from .dataset import targets_from_labels
from .layout import MODALITIES, SPLITS, DatasetSpec, check_format, data_file, get_spec, output_dim
from ..errors import ConfigError

# Small enough that a tiny model trains for a few epochs on two CPU cores in well under two
# minutes (272 / 80 / 94 samples of 20 steps), large enough that accuracy differences mean something.
DEFAULT_DEMO = dict(dataset="iemocap", aligned=True, scale=0.1, seed=0, bias_modality=None,
                    bias_strength=0.0, signal=1.0)

MIN_SPLIT_SIZE = 4
# How often each modality's signal reflects the sample's true label (text, audio, vision).
MODALITY_RELIABILITY = {"text": 0.85, "audio": 0.75, "vision": 0.7}
# Signal amplitude per modality (before `signal` scales it) relative to unit noise.
MODALITY_AMPLITUDE = {"text": 2.5, "audio": 2.0, "vision": 2.0}
SIGNAL_STEP_FRACTION = 0.6     # share of non-padded steps that carry the label signal
SHORTCUT_AMPLITUDE = 2.0       # the shortcut is stronger and cleaner than the genuine signal
AUDIO_NEG_INF_FRACTION = 0.02  # share of non-padded audio entries set to -inf
IEMOCAP_EMOTION_PRIOR = (0.35, 0.2, 0.2, 0.25)
PICKLE_PROTOCOL = 4
# The raw text of MMSA files: words that say nothing, one sentiment word per class (most negative first,
# spread over the classes of the dataset's classification task), and the cue words a shortcut planted in
# text adds (the same spread).
FILLER_WORDS = ("the", "a", "it", "was", "so", "and", "i", "think", "this", "movie", "really", "just")
SENTIMENT_WORDS = ("terrible", "bad", "dull", "okay", "fine", "good", "great")
CUE_WORDS = ("alas", "ugh", "hmm", "well", "yes", "wow", "yay")
# Writing a file holds all of it in memory, the pickled copy of its largest array and the generator's
# temporaries at once: about this many times its size at the peak.
PEAK_MEMORY_FACTOR = 2.5


def split_sizes(dataset: str, scale: float) -> tuple[int, int, int]:
    """N per split: the real sizes times `scale`, rounded, at least MIN_SPLIT_SIZE."""
    return tuple(max(MIN_SPLIT_SIZE, int(round(n * scale))) for n in get_spec(dataset).split_sizes)


def file_bytes(dataset: str, aligned: bool, scale: float, data_format: str = "mult", extra_splits: int = 0) -> int:
    """About how many bytes the file write_synthetic writes with these arguments holds."""
    spec = get_spec(dataset)
    sizes = split_sizes(dataset, scale)
    n = sum(sizes) + extra_splits * sizes[-1]
    item = 4 if data_format == "mmsa" else 8
    per_sample = sum(length * dim for length, dim in zip(spec.seq_lens(aligned, data_format),
                                                         spec.feature_dims(data_format)))
    return n * per_sample * item


def available_memory() -> int | None:
    """Bytes of memory the system can still hand out (Linux's MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(path: Path, nbytes: int, scale: float) -> None:
    """Refuse, before anything is drawn, a file that the memory or the disk at `path` cannot hold."""
    memory = available_memory()
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    disk = shutil.disk_usage(folder).free
    for need, have, where in ((int(nbytes * PEAK_MEMORY_FACTOR), memory, "memory available"),
                              (nbytes, disk, f"free space in {folder}")):
        if have is not None and need > have:
            fitting = scale * have / need
            raise ConfigError(f"--scale {scale:g} asks for a file of about {nbytes / 2**30:.2f} GiB, which needs "
                              f"{need / 2**30:.2f} GiB of {where} and there are {have / 2**30:.2f} GiB; choose "
                              f"--scale {fitting:.3g} or less (1 is the real dataset's size). Nothing was written.")


def _latent_size(spec: DatasetSpec) -> int:
    return 4 if spec.label_shape == (4, 2) else 2


def _directions(spec: DatasetSpec, modality: str, seed: int, fmt: str = "mult") -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal (d_m, k) matrices: the genuine signal's directions and the shortcut's."""
    k = _latent_size(spec)
    rng = np.random.default_rng([seed, 7, MODALITIES.index(modality)])
    basis, _ = np.linalg.qr(rng.standard_normal((spec.dim(modality, fmt), 2 * k)))
    return basis[:, :k], basis[:, k:]


def _offset(spec: DatasetSpec, modality: str, seed: int, fmt: str = "mult") -> np.ndarray:
    """A per-feature mean, shared by all splits, so that features are not zero-mean."""
    rng = np.random.default_rng([seed, 11, MODALITIES.index(modality)])
    return rng.normal(0.0, 0.5, size=spec.dim(modality, fmt))


def signal_directions(dataset: str, modality: str, seed: int = 0, data_format: str = "mult") -> np.ndarray:
    """The (d_m, k) directions the genuine label signal of `modality` is written along."""
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality '{modality}'; valid: {', '.join(MODALITIES)}")
    return _directions(get_spec(dataset), modality, seed, data_format)[0]


def shortcut_directions(dataset: str, modality: str, seed: int = 0, data_format: str = "mult") -> np.ndarray:
    """The (d_m, k) directions a planted shortcut is written along (k = 4 for IEMOCAP, else 2).

    Averaging a sample's non-padded steps and projecting on these columns recovers the shortcut
    latent (up to noise), e.g. to check whether a model's predictions follow it.
    """
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality '{modality}'; valid: {', '.join(MODALITIES)}")
    return _directions(get_spec(dataset), modality, seed, data_format)[1]


def _draw_labels(spec: DatasetSpec, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels in the file's layout, latent (n, k)) for n random samples."""
    if spec.label_shape == (4, 2):
        emotion = rng.choice(4, size=n, p=IEMOCAP_EMOTION_PRIOR)
        present = np.eye(4)[emotion]
        labels = np.stack([1.0 - present, present], axis=-1)
        return labels, present
    # Real sentiment scores are annotator averages, skewed slightly positive: MOSI/MOSEI's in thirds
    # of [-3, 3], SIMS's in fifths of [-1, 1].
    bound = spec.score_range
    steps = 3 if bound == 3.0 else 5
    score = np.clip(np.round(rng.normal(0.4, 1.3, size=n) * bound / 3 * steps) / steps, -bound, bound)
    half = bound / 2
    latent = np.stack([score / half, np.abs(score) / half - 1.0], axis=-1)
    return score.reshape(n, 1, 1), latent


def _score_of(spec: DatasetSpec, latent: np.ndarray) -> np.ndarray:
    """The sentiment score a latent of _draw_labels encodes."""
    return latent[:, 0] * spec.score_range / 2


def _corrupt(latent: np.ndarray, keep: float, spec: DatasetSpec, rng: np.random.Generator) -> np.ndarray:
    """`latent` where each row is kept with probability `keep`, otherwise a fresh random label's."""
    _, random_latent = _draw_labels(spec, rng, len(latent))
    kept = rng.random(len(latent)) < keep
    return np.where(kept[:, None], latent, random_latent)


def _valid_lengths(rng: np.random.Generator, n: int, seq_lens: tuple[int, int, int], aligned: bool) -> dict:
    """Non-padded length of each sample per modality (padding is on the left)."""
    text_len = seq_lens[0]
    base = rng.integers(max(1, text_len // 3), text_len + 1, size=n)
    lengths = {"text": base}
    for modality, length in zip(MODALITIES[1:], seq_lens[1:]):
        if aligned:
            lengths[modality] = np.minimum(base, length)
        else:
            # Audio and vision frames span the same utterance as the words, at their own rate.
            stretch = rng.uniform(0.8, 1.0, size=n)
            lengths[modality] = np.clip(np.round(base / text_len * length * stretch), 1, length).astype(np.int64)
    return lengths


def _features(spec: DatasetSpec, modality: str, rng: np.random.Generator, valid: np.ndarray, length: int,
              offset: np.ndarray, latent: np.ndarray, directions: np.ndarray, amplitude: float,
              shortcut: np.ndarray | None, shortcut_dirs: np.ndarray, fmt: str = "mult") -> np.ndarray:
    n, dim = len(valid), spec.dim(modality, fmt)
    steps = np.arange(length)
    if fmt == "mmsa":  # MMSA pads at the end, MulT at the start
        mask = steps[None, :] < valid[:, None]
    else:
        mask = steps[None, :] >= (length - valid)[:, None]                # (n, L): non-padded steps
    x = rng.standard_normal((n, length, dim)) + offset
    gate = (rng.random((n, length)) < SIGNAL_STEP_FRACTION) * rng.uniform(0.5, 1.5, size=(n, 1))
    x += amplitude * gate[..., None] * (latent @ directions.T)[:, None, :]
    if shortcut is not None:
        x += SHORTCUT_AMPLITUDE * (shortcut @ shortcut_dirs.T)[:, None, :]
    if modality == "audio":
        # Like COVAREP's log features of silence; channel 0 is spared so that a real step never
        # reads as padding (an all-zero channel 0) once -inf becomes 0.
        holes = rng.random((n, length, dim)) < AUDIO_NEG_INF_FRACTION
        holes[..., 0] = False
        x[holes] = -np.inf
    x[~mask] = 0.0
    return x


def _split(spec: DatasetSpec, split: str, n: int, aligned: bool, seed: int, bias_modality: str | None,
           bias_strength: float, signal: float, stream: int, fmt: str = "mult") -> dict:
    rng = np.random.default_rng([seed, stream])
    seq_lens = spec.seq_lens(aligned, fmt)
    labels, latent = _draw_labels(spec, rng, n)
    lengths = _valid_lengths(rng, n, seq_lens, aligned)

    shortcut = None
    if bias_modality is not None:
        # A stream of its own, so that with the same seed a biased file differs from the unbiased
        # one only by the shortcut: same labels, same genuine features, same noise.
        bias_rng = np.random.default_rng([seed, stream, 13])
        _, random_latent = _draw_labels(spec, bias_rng, n)
        if split not in ("train", "valid"):
            shortcut = random_latent
        else:
            follows = bias_rng.random(n) < bias_strength
            shortcut = np.where(follows[:, None], latent, random_latent)

    part, seen_scores = {}, {}
    for modality, length in zip(MODALITIES, seq_lens):
        genuine, shortcut_dirs = _directions(spec, modality, seed, fmt)
        seen = _corrupt(latent, MODALITY_RELIABILITY[modality], spec, rng)
        seen_scores[modality] = _score_of(spec, seen)
        x = _features(spec, modality, rng, lengths[modality], length, _offset(spec, modality, seed, fmt), seen,
                      genuine, signal * MODALITY_AMPLITUDE[modality],
                      shortcut if modality == bias_modality else None, shortcut_dirs, fmt)
        if fmt == "mmsa" or (modality == "text" and spec.text_dtype == "float32"):
            x = x.astype(np.float32)
        part[modality] = x
    if fmt == "mmsa":
        # Its own stream too: the words change nothing else the file holds.
        words = _raw_text(spec, np.random.default_rng([seed, stream, 17]), seen_scores["text"],
                          _score_of(spec, shortcut) if bias_modality == "text" else None)
        return _mmsa_split(spec, part, labels, lengths, seen_scores, words, split, aligned)
    part["labels"] = labels
    if spec.has_ids:
        part["id"] = np.array(
            [[f"synth{split[:2]}{i // 4:05d}".encode(), str(i % 4).encode(), str(int(lengths["text"][i])).encode()]
             for i in range(n)],
            dtype="S16",
        )
    return part


def _raw_text(spec: DatasetSpec, rng: np.random.Generator, text_scores: np.ndarray,
              shortcut_scores: np.ndarray | None) -> np.ndarray:
    """The words of each sample: one to three filler words, the sentiment word of the class the text
    features were drawn from (so the words tell the label as often as the text features do) and, with a
    shortcut planted in text, the cue word of the shortcut's class; in random order."""
    top = output_dim(spec.default_task) - 1  # classes 0..top of the dataset's classification task

    def words_of(vocabulary: tuple[str, ...], scores: np.ndarray) -> list[str]:
        classes = targets_from_labels(np.asarray(scores).reshape(-1, 1, 1), spec.default_task)[0]
        return [vocabulary[c * (len(vocabulary) - 1) // top] for c in classes]

    sentiment = words_of(SENTIMENT_WORDS, text_scores)
    cues = words_of(CUE_WORDS, shortcut_scores) if shortcut_scores is not None else [None] * len(sentiment)
    texts = []
    for word, cue in zip(sentiment, cues):
        chosen = [str(w) for w in rng.choice(FILLER_WORDS, size=rng.integers(1, 4))] + [word] + ([cue] if cue else [])
        texts.append(" ".join(chosen[i] for i in rng.permutation(len(chosen))))
    return np.array(texts, dtype=str)


def _mmsa_split(spec: DatasetSpec, part: dict, labels: np.ndarray, lengths: dict, seen_scores: dict,
                raw_text: np.ndarray, split: str, aligned: bool) -> dict:
    """A split in MMSA's keys from the features, labels and lengths _split drew."""
    n = len(labels)
    part["regression_labels"] = labels.reshape(n).astype(np.float32)
    if spec.unimodal_labels:
        # Each modality's own label is the one its signal was drawn from, as annotators of one modality
        # alone would have judged it.
        for modality in MODALITIES:
            part[UNIMODAL_KEYS[LABEL_KEYS[modality]]] = seen_scores[modality].astype(np.float32)
    if not aligned:
        part["audio_lengths"] = [int(v) for v in lengths["audio"]]
        part["vision_lengths"] = [int(v) for v in lengths["vision"]]
    part["id"] = np.array([f"synth{split}{i // 4:05d}$_${i % 4}" for i in range(n)], dtype=str)
    part["raw_text"] = raw_text
    return part


def write_synthetic(data_dir: str | Path, dataset: str, aligned: bool = True, scale: float = 0.05,
                    seed: int = 0, bias_modality: str | None = None, bias_strength: float = 0.0,
                    signal: float = 1.0, data_format: str = "mult", extra_splits: tuple[str, ...] = (),
                    path: str | Path | None = None) -> Path:
    """Write a synthetic `dataset` pickle into `data_dir` under its real file name (or at `path`); return
    its path.

    dataset: iemocap | mosei_senti | mosi. aligned: the aligned or the unaligned ("_noalign") file,
    with the real sequence lengths of each. scale: fraction of the real split sizes (each split
    gets at least MIN_SPLIT_SIZE samples). seed: everything is drawn from it, so the same arguments
    give a byte-identical file. bias_modality (text | audio | vision | None) and bias_strength in
    [0, 1]: plant a shortcut in that modality that agrees with the label with this probability in
    train and valid and is independent of it in test. signal: scale of the genuine label signal in
    every modality (0 = pure noise).

    data_format: mult (MulT's layout and file names) or mmsa (MMSA's, for mosi / mosei_senti / sims;
    written to <DATASET>/Processed/{aligned,unaligned}_<L_t>.pkl in data_dir). extra_splits: more
    split names (e.g. test_ood), each drawn as test is (a planted shortcut independent of the label).

    The whole file is built in memory before it is pickled, like the real ones: at scale 1 the
    unaligned MOSEI file needs many GB, so a scale whose file the memory or the disk cannot hold is
    refused up front. The file appears atomically (temporary file + rename).
    """
    spec = get_spec(dataset)
    check_format(data_format)
    if data_format not in spec.formats:
        raise ConfigError(f"{dataset} comes only as {', '.join(spec.formats)} files, not {data_format}")
    for name in extra_splits:
        if not SPLIT_NAME.fullmatch(name) or name in SPLITS:
            raise ConfigError(f"extra split name {name!r} must differ from train/valid/test and use letters, digits, "
                              "'_', '-' and '.' only (e.g. test_ood)")
    if not (scale > 0 and math.isfinite(scale)):
        raise ConfigError(f"scale must be a positive finite fraction of the real size (e.g. 0.05), got {scale}")
    if bias_modality is not None and bias_modality not in MODALITIES:
        raise ConfigError(f"bias_modality must be one of {', '.join(MODALITIES)} or None, got '{bias_modality}'")
    if not 0.0 <= bias_strength <= 1.0:
        raise ConfigError(f"bias_strength must lie in [0, 1], got {bias_strength}")
    # Without a modality to plant it in, a strength would silently plant nothing.
    if bias_strength > 0 and bias_modality is None:
        raise ConfigError(f"bias_strength {bias_strength} needs a bias_modality (CLI: --bias-modality "
                          "text|audio|vision) to plant the shortcut in")
    if signal < 0:
        raise ConfigError(f"signal must be non-negative, got {signal}")

    path = Path(path) if path is not None else data_file(data_dir, dataset, aligned, data_format)
    check_fits(path, file_bytes(dataset, aligned, scale, data_format, len(extra_splits)), scale)
    sizes = split_sizes(dataset, scale)
    names = list(SPLITS) + list(dict.fromkeys(extra_splits))
    data = {split: _split(spec, split, n, aligned, seed, bias_modality, bias_strength, signal, stream, data_format)
            for stream, (split, n) in enumerate(zip(names, sizes + (sizes[-1],) * (len(names) - len(SPLITS))))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the data folder {path.parent}: {err.strerror or err}") from None
    remove_stale_temporaries(path.parent)
    with replacing(path) as tmp:
        with open(tmp, "wb") as handle:
            pickle.dump(data, handle, protocol=PICKLE_PROTOCOL)
    return path
