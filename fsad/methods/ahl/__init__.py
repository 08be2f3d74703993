"""AHL (Zhu et al., CVPR 2024): anomaly heterogeneity learning on a DRA or DevNet base.

Pipeline (spec §7), after the base model is trained and its trunk frozen:

1. Features: the trunk's maps at every pyramid scale for training normals,
   seen anomalies, three pseudo-anomaly families of every training normal
   (CutMix, CutPaste, Perlin-mask blends) and the test set: one *bank*.
2. HADG: k-means (C clusters) on normal features; one task per ordered pair of
   clusters (support normals from one, query normals from the other) plus one
   task on all normals split 50/50; seen anomalies split so that the query holds
   "virtual unseen" ones; each task turns about half of its normals into pseudo
   anomalies, support and query from two different families.
3. CDL: every epoch, T base models start from the unified head weights, take
   `inner_steps` SGD steps on their support set (differentiably: MAML second
   order, or first order by switch), are scored on their query set, and the
   unified heads take one Adam step on sum_i w_i L_i. The T tasks are one vmapped
   program over padded, masked index arrays, spread over the run's devices.
4. Importance: a BiLSTM psi predicts each sample's next-epoch scores under the T
   models from the previous K epochs; r_i weighs the squared error of the
   predicted (min-max scaled) scores against the labels, and w = softmax(-(r / mean r)
   / 0.1) by default (ahl.weight_relative, ahl.weight_temperature; the paper's
   softmax(-r) is `:paper`'s).

Modules, in the pipeline's order: `bank` (1), `tasks` (2), `heads` (the base method's
heads as functions of bank features), `meta_step` (3's step), `importance` (4),
`meta_train` (the epochs, checkpointed), `stage` (the whole stage, and new images scored
with a finished run). The names below are the package's public functions, so that
`from fsad.methods import ahl; ahl.build_tasks(...)` reaches each from one place.
"""

from fsad.methods.ahl.bank import (FAMILIES, build_bank, load_or_build_bank, make_feature_fn,
                                   make_pseudo, n_scales_of, other_indices)
from fsad.methods.ahl.heads import (HEAD_INITS, HeadModel, dra_heads, fresh_batch_stats,
                                    head_model, head_models, make_head_scorer,
                                    reference_means)
from fsad.methods.ahl.importance import (ERROR_FORMS, ERROR_SCALES, PSI_FITS,
                                         check_error_scale, generalisation_errors,
                                         importance_weights, make_psi_fns, released_errors,
                                         scaled_scores, weight_spread, weights_from_errors)
from fsad.methods.ahl.meta_step import (CHUNK_SIZES, TASK_BATCHINGS, check_task_batching,
                                        chunk_rows, chunked_sum, fitted_meta_step,
                                        make_meta_step)
from fsad.methods.ahl.meta_train import MetaState, run_meta_training
from fsad.methods.ahl.stage import ahl_stage, run_ahl, score_unified, unified_heads_of
from fsad.methods.ahl.tasks import (CLASS_SHARES, CLUSTER_ON, NORMAL, PSEUDO, SEEN, Tasks,
                                    build_tasks, class_balance, cluster_normals,
                                    feature_health, image_descriptors, normal_clusters)

__all__ = [
    "FAMILIES", "build_bank", "load_or_build_bank", "make_feature_fn", "make_pseudo",
    "n_scales_of", "other_indices",
    "HEAD_INITS", "HeadModel", "dra_heads", "fresh_batch_stats", "head_model", "head_models",
    "make_head_scorer", "reference_means",
    "ERROR_FORMS", "ERROR_SCALES", "PSI_FITS", "check_error_scale", "generalisation_errors",
    "importance_weights", "make_psi_fns", "released_errors", "scaled_scores",
    "weight_spread", "weights_from_errors",
    "CHUNK_SIZES", "TASK_BATCHINGS", "check_task_batching", "chunk_rows", "chunked_sum",
    "fitted_meta_step", "make_meta_step",
    "MetaState", "run_meta_training",
    "ahl_stage", "run_ahl", "score_unified", "unified_heads_of",
    "CLASS_SHARES", "CLUSTER_ON", "NORMAL", "PSEUDO", "SEEN", "Tasks", "build_tasks",
    "class_balance", "cluster_normals", "feature_health", "image_descriptors",
    "normal_clusters",
]
