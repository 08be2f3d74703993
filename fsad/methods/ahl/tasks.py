"""AHL's heterogeneous tasks (HADG, spec §7 step 2): k-means clusters of the normals,
one task per ordered pair of clusters plus one on all normals, each task's support and
query sets as padded index arrays into the bank (`fsad.methods.ahl.bank`), with the
class-balanced sample weights of the base method and the importance pool."""

from __future__ import annotations

import dataclasses
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from fsad.buckets import bucketed, coarse_bucketed, pad_to, rows_with_anomaly_room
from fsad.errors import UserError
from fsad.methods.ahl.bank import FAMILIES

NORMAL, SEEN, PSEUDO = 0, 1, 2


@dataclasses.dataclass
class Tasks:
    """T tasks as padded index arrays into the bank.

    support_idx/support_lab/support_mask/support_weight: [T, S]; query_*: [T, Q]
    (labels 0/1/2, mask 0 on padding; weight: the class-balanced weight of each sample,
    0 on padding, summing to 1 per task, see `class_balance`). families: [T, 2]
    (support, query) family ids.
    pool_idx: [P] the samples the importance model tracks (every query sample);
    pool_lab: [P] {0, 1}; pool_coef: [T, P] c_j per model (0 where excluded:
    that model's own support normals).
    n_normal, n_anomaly: the bank's layout (`fsad.methods.ahl.bank`).
    """

    support_idx: np.ndarray
    support_lab: np.ndarray
    support_mask: np.ndarray
    support_weight: np.ndarray
    query_idx: np.ndarray
    query_lab: np.ndarray
    query_mask: np.ndarray
    query_weight: np.ndarray
    families: np.ndarray
    pool_idx: np.ndarray
    pool_lab: np.ndarray
    pool_coef: np.ndarray
    n_normal: int
    n_anomaly: int

    @property
    def num_tasks(self) -> int:
        return len(self.support_idx)

    def pool_in_query_sets(self) -> np.ndarray:
        """[T, P] float32: 1 where pool sample p is in task t's query set."""
        return np.stack([np.isin(self.pool_idx, idx[mask > 0]) for idx, mask in
                         zip(self.query_idx, self.query_mask)]).astype(np.float32)

    def pool_classes(self) -> np.ndarray:
        """[P] NORMAL, SEEN or PSEUDO: each pool sample's label in the query sets."""
        real = self.query_mask > 0
        label = dict(zip(self.query_idx[real].tolist(), self.query_lab[real].tolist()))
        return np.array([label[i] for i in self.pool_idx.tolist()], np.int32)

    def device_arrays(self, bucket: int = 1) -> dict:
        """The meta-step's task arrays: support_/query_ idx, lab and weight, [T, S'] and
        [T, Q'], each set's width padded to a multiple of `bucket` (index 0, label
        normal, weight 0: a padded sample adds nothing), so that the tasks of other seeds
        and settings, whose widths differ a little, are one program."""
        out = {}
        for k in ("support_idx", "support_lab", "support_weight", "query_idx", "query_lab",
                  "query_weight"):
            a = getattr(self, k)
            out[k] = jnp.asarray(pad_to(a, bucketed(a.shape[1], bucket), axis=1))
        return out

    def padded_bank_rows(self, bucket: int = 1) -> int:
        """The bank's rows (normals, seen anomalies, a pseudo anomaly of every normal per
        family) padded to a multiple of `bucket` that leaves room for `ANOMALY_ROOM` seen
        anomalies: 1 to 10 shots of the same normals are one bank shape."""
        return rows_with_anomaly_room((1 + len(FAMILIES)) * self.n_normal, self.n_anomaly,
                                      bucket)

    def padded_pool_idx(self, bucket: int = 1) -> np.ndarray:
        """[P'] pool_idx padded with index 0 (the meta-step's pool scores of the padding
        rows are computed and left out): to `coarse_bucketed` lengths, the pool's size
        varying by hundreds from seed to seed (each query set's pseudo anomalies are
        drawn anew)."""
        return pad_to(self.pool_idx, coarse_bucketed(len(self.pool_idx), bucket))


def _pad(rows: list[np.ndarray], fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), fill, np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return out, mask


def _pad_float(rows: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def cluster_normals(normal_flat: np.ndarray, n_clusters: int, seed: int,
                    min_size: int = 3) -> list[np.ndarray]:
    """k-means clusters of normal indices, clusters smaller than min_size dropped.

    Rows that repeat (all-zero features of a trunk that silenced most normals) can leave
    fewer distinct clusters than asked. scikit-learn's warning about it is not shown: the
    kept clusters' sizes go to the run's results (cluster_sizes), and `feature_health`,
    `normal_clusters` and `build_tasks` say in fsad's words what the user can do."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters, random_state=seed, n_init=10).fit(normal_flat)
    clusters = [np.flatnonzero(km.labels_ == c) for c in range(n_clusters)]
    return [c for c in clusters if len(c) >= min_size]


CLUSTER_ON = ("auto", "features", "images")


def image_descriptors(images: np.ndarray, side: int = 16, chunk: int = 256) -> np.ndarray:
    """Area-downsampled pixels, the representation k-means falls back to.

    images: [N, H, W, 3] uint8 -> [N, side * side * 3] float32 in [0, 1].
    """
    out = []
    for s in range(0, len(images), chunk):
        x = jnp.asarray(images[s:s + chunk], jnp.float32) / 255.0
        small = jax.image.resize(x, (len(x), side, side, 3), "linear", antialias=True)
        out.append(np.asarray(small).reshape(len(x), -1))
    return np.concatenate(out)


def normal_clusters(normal_flat: np.ndarray, normals: np.ndarray, n_clusters: int, seed: int,
                    cluster_on: str = "auto") -> tuple[list[np.ndarray], dict]:
    """HADG step 1: k-means clusters of the normal images (kept clusters of 3 or more).

    cluster_on: "features" clusters the frozen trunk's flattened features (spec §7);
    "images" clusters downsampled pixels; "auto" clusters the features and falls back
    to the pixels, with a warning, when fewer than 2 clusters survive (a trunk that
    maps nearly every normal to all-zero features leaves one cluster).

    Args:
      normal_flat: [Nn, D] flattened features; normals: [Nn, H, W, 3] uint8 images.
    Returns:
      (clusters, info: feature_health's fields + "cluster_on": what was clustered).
    """
    if cluster_on not in CLUSTER_ON:
        raise UserError(f"ahl.cluster_on={cluster_on!r} is not a clustering input; use one "
                        f"of {', '.join(CLUSTER_ON)}")
    clusters = [] if cluster_on == "images" else cluster_normals(normal_flat, n_clusters, seed)
    info = {**feature_health(normal_flat, clusters), "cluster_on": "features"}
    if cluster_on == "images" or (cluster_on == "auto" and len(clusters) < 2):
        if cluster_on == "auto":
            logging.warning("AHL: k-means on the frozen features left %d cluster(s) of 3 or "
                            "more normals; clustering the downsampled images instead "
                            "(ahl.cluster_on=auto; recorded as cluster_on=images)", len(clusters))
        clusters = cluster_normals(image_descriptors(normals), n_clusters, seed)
        info["cluster_on"] = "images"
    if 2 <= len(clusters) < n_clusters:  # fewer than 2 is build_tasks' error
        kept = sum(len(c) for c in clusters)
        logging.warning("AHL: k-means kept %d of ahl.clusters=%d clusters (those of fewer "
                        "than 3 normals are dropped, with their %d of %d normals): %d "
                        "cluster-pair tasks instead of %d", len(clusters), n_clusters,
                        len(normal_flat) - kept, len(normal_flat),
                        len(clusters) * (len(clusters) - 1), n_clusters * (n_clusters - 1))
    return clusters, info


def feature_health(normal_flat: np.ndarray, clusters: list[np.ndarray],
                   dead_limit: float = 0.5, largest_limit: float = 0.9) -> dict:
    """How much the frozen trunk leaves for k-means to separate; warns when little.

    A base trunk can learn to map most normal images to all-zero features (ReLU
    after a strongly negative BN shift: a DevNet optimum, the normal score is 0).
    k-means then finds one giant cluster and a few outliers, and every HADG task
    is built around a handful of images.

    Args:
      normal_flat: [Nn, D] flattened normal features; clusters: the kept clusters.
    Returns:
      {"dead_normal_fraction": share of normals whose features are all zero,
       "largest_cluster_fraction": largest kept cluster / Nn}.
    """
    dead = float(np.mean(~np.any(normal_flat != 0, axis=1)))
    largest = max((len(c) for c in clusters), default=0) / max(len(normal_flat), 1)
    if dead > dead_limit or largest > largest_limit:
        logging.warning(
            "AHL: the frozen trunk gives %.0f%% of the normal images all-zero features and "
            "the largest k-means cluster holds %.0f%% of them, so the tasks differ little "
            "and AHL has little to learn from. Train the base model with a lower lr or "
            "weight decay, or use AHL on DRA, whose heads keep the features alive.",
            100 * dead, 100 * largest)
    return {"dead_normal_fraction": dead, "largest_cluster_fraction": largest}


# Each class's share of a task's loss, as the base method's balanced training batches
# give it (spec §7 step 5): DRA draws a third normal, a third pseudo, a third seen
# anomalies; DevNet half normal, half anomalies (the released AHL code sums a seen and a
# pseudo deviation loss over batches of a third each, so each anomaly kind weighs 1/4).
CLASS_SHARES = {"dra": {NORMAL: 1 / 3, PSEUDO: 1 / 3, SEEN: 1 / 3},
                "devnet": {NORMAL: 1 / 2, PSEUDO: 1 / 4, SEEN: 1 / 4}}


def class_balance(labels: np.ndarray, base: str) -> np.ndarray:
    """Per-sample weights that give each class present its base method's share.

    Args:
      labels: [N] in {0 normal, 1 seen, 2 pseudo}; base: "dra" or "devnet".
    Returns:
      [N] float32 summing to 1: class c's samples share CLASS_SHARES[base][c] equally
      (shares renormalised over the classes present; DevNet's anomaly half goes to
      whichever anomaly kinds are present).
    """
    shares = dict(CLASS_SHARES[base])
    present = {c for c in shares if np.any(labels == c)}
    if base == "devnet" and present & {SEEN, PSEUDO} != {SEEN, PSEUDO}:
        for c in present & {SEEN, PSEUDO}:
            shares[c] = 1 / 2
    total = sum(shares[c] for c in present)
    w = np.zeros(len(labels), np.float32)
    for c in present:
        members = labels == c
        w[members] = shares[c] / total / members.sum()
    return w


def build_tasks(clusters: list[np.ndarray], n_normal: int, n_anomaly: int, seed: int,
                pseudo_frac: float = 0.5, c_unseen: float = 1.0, c_other: float = 0.5,
                base: str = "dra", split_task: bool = True) -> Tasks:
    """HADG tasks from normal clusters (spec §7): one per ordered pair of clusters, and
    with split_task one on all normals split in two at random (the paper's T = 7 for 3
    clusters; the released loader makes only the C(C-1) pairs).

    Args:
      clusters: lists of normal indices (bank rows [0, n_normal)).
      n_normal, n_anomaly: bank layout sizes.
      base: "dra" or "devnet", whose class balance the task losses keep.
    Raises:
      UserError: fewer than 2 usable clusters.
    """
    if len(clusters) < 2:
        raise UserError(f"k-means left {len(clusters)} cluster(s) with 3 or more normals and "
                        f"AHL needs 2; use more normal images, fewer clusters "
                        f"(--config.ahl.clusters) or --config.ahl.cluster_on=auto")
    rng = np.random.default_rng(seed)
    anomalies = np.arange(n_normal, n_normal + n_anomaly)
    normal_sets = [(clusters[i], clusters[j]) for i in range(len(clusters))
                   for j in range(len(clusters)) if i != j]
    perm = rng.permutation(n_normal)  # drawn either way: the pairs' draws stay the same
    if split_task:
        normal_sets.append((np.sort(perm[:n_normal // 2]), np.sort(perm[n_normal // 2:])))

    def with_pseudo(normals, family):
        """Each normal made a pseudo anomaly with probability pseudo_frac; a set keeps
        one normal at least (the one whose draw came highest): without one, its task
        has nothing to tell the anomalies from."""
        draws = rng.uniform(size=len(normals))
        flip = draws < pseudo_frac
        if len(flip) and flip.all():
            flip[np.argmax(draws)] = False
        idx = np.where(flip, n_normal + n_anomaly + family * n_normal + normals, normals)
        return idx, np.where(flip, PSEUDO, NORMAL)

    sup_rows, sup_labs, qry_rows, qry_labs, fams, support_normals = [], [], [], [], [], []
    for sup_n, qry_n in normal_sets:
        fam_s, fam_q = rng.choice(len(FAMILIES), 2, replace=False)
        a = rng.permutation(anomalies)
        if n_anomaly > 1:
            half = n_anomaly // 2
            sup_a = a[:half]
            qry_a = np.concatenate([sup_a[:2], a[half:]])  # 2 seen + the virtual unseen half
        else:
            sup_a = qry_a = a
        s_idx, s_lab = with_pseudo(sup_n, fam_s)
        q_idx, q_lab = with_pseudo(qry_n, fam_q)
        sup_rows.append(np.concatenate([s_idx, sup_a]))
        sup_labs.append(np.concatenate([s_lab, np.full(len(sup_a), SEEN)]))
        qry_rows.append(np.concatenate([q_idx, qry_a]))
        qry_labs.append(np.concatenate([q_lab, np.full(len(qry_a), SEEN)]))
        fams.append((fam_s, fam_q))
        support_normals.append(set(sup_n.tolist()))
    s_idx, s_mask = _pad(sup_rows)
    s_lab, _ = _pad(sup_labs)
    q_idx, q_mask = _pad(qry_rows)
    q_lab, _ = _pad(qry_labs)
    s_w = _pad_float([class_balance(lab, base) for lab in sup_labs], s_idx.shape[1])
    q_w = _pad_float([class_balance(lab, base) for lab in qry_labs], q_idx.shape[1])
    # the importance pool: every query sample; c_j per model
    pool = np.unique(np.concatenate(qry_rows))
    is_anom = pool >= n_normal
    pool_lab = is_anom.astype(np.int32)
    coef = np.zeros((len(normal_sets), len(pool)), np.float32)
    for i, rows in enumerate(sup_rows):
        in_support = np.isin(pool, rows)
        coef[i] = np.where(is_anom, np.where(in_support, c_other, c_unseen),
                           np.where(in_support, 0.0, c_other))
        coef[i, np.isin(pool, list(support_normals[i]))] = 0.0  # X_n,i excluded
    return Tasks(s_idx, s_lab, s_mask, s_w, q_idx, q_lab, q_mask, q_w, np.array(fams), pool,
                 pool_lab, coef, n_normal, n_anomaly)
