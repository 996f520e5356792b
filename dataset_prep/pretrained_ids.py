"""The ``sasrec_item_table`` hook: an ID model trained on the run's own training split, its item table saved.

HDRec's ID semantics is the item table of a SASRec pre-trained on the same split (spec HDRec §2.3). The
hook trains ``model`` (FastSASRec, RecBole's SASRec on our encoder) through the package's run path with
every setting that shapes the split copied from the run's config, reloads the best validation checkpoint
and writes ``item_embedding`` rows keyed by item token (``<dataset>.sasrec<d>.npz``). The fingerprint holds
the training split's digest, so a change of filters or split retrains it; a table the user supplies at
that path (no manifest) is used as is.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import List

import numpy as np

from recbole_llmfuse import checkpoint
from recbole_llmfuse.config import Config
from recbole_llmfuse.dataset_prep import itememb
from recbole_llmfuse.dataset_prep.hooks import PrepHook, hook_defaults_file
from recbole_llmfuse.files import temp_dir
from recbole_llmfuse.quick_start import execute

#: config keys that shape the dataset and its split: the pre-training run must see the same ones
SPLIT_KEYS = ("load_col", "unload_col", "unused_col", "rm_dup_inter", "val_interval", "filter_inter_by_user_or_item",
              "user_inter_num_interval", "item_inter_num_interval", "eval_args", "USER_ID_FIELD", "ITEM_ID_FIELD",
              "TIME_FIELD", "field_separator", "seq_separator", "seed", "reproducibility", "use_gpu", "gpu_id")


class SASRecItemTableHook(PrepHook):
    name = "sasrec_item_table"
    defaults_file = hook_defaults_file(name)
    uses_split = True

    def outputs(self) -> List[str]:
        return [os.path.join(self.data_path, f"{self.dataset}.sasrec{int(self.params['hidden_size'])}.npz")]

    def work_dirs(self) -> List[str]:
        return glob.glob(os.path.join(self.data_path, f".{self.dataset}.{self.name}-*"))

    def run(self, **_) -> dict:
        settings = {k: self.config[k] for k in SPLIT_KEYS if self.config[k] is not None}
        params = {k: v for k, v in self.params.items() if k not in ("model", "auto_run")}
        work = temp_dir(self.data_path, f".{self.dataset}.{self.name}-")
        try:
            config = Config(self.params["model"], self.dataset, argv=[], config_dict={
                **settings, **params, "data_path": os.path.dirname(self.data_path), "checkpoint_dir": work,
                "show_progress": False, "loss_type": "CE", "train_neg_sample_args": None, "prep_hooks": []})
            run = execute(config, test=False, verbose=False)
            checkpoint.load_weights(run.model, run.model_file)
            table = run.model.item_embedding.weight.detach().cpu().numpy()[1:]
            dataset = run.train_data.dataset
            tokens = dataset.field2id_token[dataset.iid_field][1:]
            itememb.write_table(self.outputs()[0], tokens, table.astype(np.float32))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report = {"items": len(tokens), "dim": int(table.shape[1]), "best_valid_score": float(run.best_valid_score),
                  "epochs": len(run.trainer.epoch_times)}
        self.write_manifest({"report": report})
        return report
