"""TRL's preference trainers fitted to peftflow's pre-tokenised rows: DPO, ORPO and KTO (trl 1.16).

Contract: `trainer_and_args(objective, kwargs, params, device) -> (trainer class, TRL config)`;
`in_memory(data)`: the split ORPO is handed (see there).
`kwargs`: tasks.train.training_arguments' keywords without the activation-checkpointing pair (each
TRL config sets `gradient_checkpointing` itself). Each class puts tasks/trainers.PeftflowTrainer
first in its MRO (NaN stop, tokens/s) and never lets TRL tokenise: training sees exactly the
tokens tasks/preference.py wrote, the ones evaluate scores (no truncation by TRL either).

- `dpo`: `trl.DPOTrainer`; TRL's `_prepare_dataset` is skipped, its collator does not truncate
  (`max_length=None`).
- `orpo`: `trl.experimental.orpo.ORPOTrainer` (experimental in 1.16; its import warning is
  silenced here, the version is pinned). Reference-free: no reference pass, no `ref` adapter. It
  always maps the dataset through `tokenize_row`, which is replaced by one that lays out the
  pre-tokenised prompt/chosen/rejected ids as TRL's own would (no BOS/EOS added: ours already end
  with the end-of-turn token). What TRL's ORPO loss is, unchanged: NLL of prompt + chosen (TRL
  computes it over the whole chosen sequence, prompt included, unlike `sft`, which trains on the
  response only) minus beta * log sigmoid(log odds(chosen) - log odds(rejected)), the odds from
  the per-token mean log-probability of each response. Its batch has no `input_ids`, so the token
  count (tokens/s) is taken from both sides' attention masks.
- `kto`: `trl.KTOTrainer` (stable in 1.16). `_prepare_dataset` is replaced by `kto_rows`: a pair
  becomes two unpaired rows (chosen -> label true, rejected -> label false, TRL's own unpairing),
  rows of `completion_ids` + `kto_label` stay as they are; rows are shuffled once with
  `train.seed` (TRL samples KTO rows sequentially, the same order every epoch, and its unpairing
  would put all desirable rows of a map batch before all undesirable ones), then each
  micro-batch gets TRL's KL completions (rotated by one within it). A KTO step covers
  `global_batch_size` completions, i.e. half as many pairs as a DPO or ORPO step. The reference
  is the base with the adapter off, as for DPO.
"""

from __future__ import annotations

import warnings

from tasks.config import Params
from tasks.preference_train import COLUMNS as PAIR_COLUMNS  # the pair columns tasks/preference.py writes

UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "kto_label")


def kto_rows(data, seed: int, micro_batch: int):
    """KTO's unpaired rows (prompt_ids, completion_ids, label, KL_completion_ids) from a processed
    split of pairs or of unpaired rows, shuffled with `seed`; see the module docstring."""
    import numpy as np
    from datasets import Dataset

    if "completion_ids" in data.column_names:
        rows = [{"prompt_ids": list(p), "completion_ids": list(c), "label": bool(lab)}
                for p, c, lab in zip(data["prompt_ids"], data["completion_ids"], data["kto_label"])]
    else:
        rows = [{"prompt_ids": list(p), "completion_ids": list(ids), "label": label}
                for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
                for ids, label in ((c, True), (r, False))]
    rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    for start in range(0, len(rows), micro_batch):  # TRL's add_kl_completion_ids, per micro-batch
        chunk = rows[start: start + micro_batch]
        shifted = [chunk[-1]["completion_ids"]] + [r["completion_ids"] for r in chunk[:-1]]
        for r, kl in zip(chunk, shifted):
            r["KL_completion_ids"] = kl
    return Dataset.from_list(rows)


def in_memory(data):
    """`data` copied into memory. ORPOTrainer maps its dataset; a map over the on-disk processed
    split would write cache files into data/processed, changing its hash (the train fingerprint,
    and DVC's record of the preprocess output)."""
    from datasets import Dataset

    return Dataset.from_dict(data.to_dict(), features=data.features)


def _dpo(base):
    from trl import DPOConfig, DPOTrainer

    class PreferenceTrainer(base, DPOTrainer):
        """DPOTrainer over the pre-tokenised pairs."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # tokenised by preprocess (tasks/preference.py)

    return PreferenceTrainer, DPOConfig, {"loss_type": ["sigmoid"], "max_length": None, "pad_to_multiple_of": None,
                                          "precompute_ref_log_probs": False}


def _orpo(base, params: Params):
    import torch

    with warnings.catch_warnings():  # "importing from trl.experimental": pinned trl, see the docstring
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    class OrpoPreferenceTrainer(base, ORPOTrainer):
        """ORPOTrainer over the pre-tokenised pairs."""

        def tokenize_row(self, feature, model=None) -> dict:
            p, c, r = (list(feature[k]) for k in PAIR_COLUMNS)
            out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for side, ids in (("chosen", c), ("rejected", r)):
                out.update({f"{side}_input_ids": p + ids, f"{side}_attention_mask": [1] * (len(p) + len(ids)),
                            f"{side}_labels": [-100] * len(p) + ids})
            return out

        def _track_num_input_tokens(self, inputs):
            mask = torch.cat([inputs["chosen_attention_mask"].flatten(), inputs["rejected_attention_mask"].flatten()])
            super()._track_num_input_tokens({"input_ids": mask, "attention_mask": mask})

    # max_length only bounds TRL's eval-time generation here (tokenize_row is ours); the rows fit it
    return OrpoPreferenceTrainer, ORPOConfig, {"max_length": params.preprocess.max_length}


def _kto(base):
    from trl import KTOConfig, KTOTrainer

    class KtoPreferenceTrainer(base, KTOTrainer):
        """KTOTrainer over pre-tokenised rows (`kto_rows`)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return kto_rows(dataset, args.seed, args.per_device_train_batch_size)

    return KtoPreferenceTrainer, KTOConfig, {"loss_type": "kto", "max_length": None, "pad_to_multiple_of": None,
                                             "precompute_ref_log_probs": False, "desirable_weight": 1.0,
                                             "undesirable_weight": 1.0}


def trainer_and_args(objective: str, kwargs: dict, params: Params, device: str):
    """(trainer class, its TRL config) for `train.objective`; see the module docstring."""
    from tasks import trainers

    cls, config, own = (_dpo(trainers.PeftflowTrainer) if objective == "dpo"
                        else _orpo(trainers.PeftflowTrainer, params) if objective == "orpo"
                        else _kto(trainers.PeftflowTrainer))
    args = config(**kwargs, **own, beta=params.train.beta, gradient_checkpointing=params.train.gradient_checkpointing,
                  disable_dropout=True)
    if device == "cuda":  # one GPU even on a multi-GPU host (see tasks/trainers.training_args)
        _ = args.device
        args._n_gpu = 1
    return cls, args
