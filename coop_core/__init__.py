"""coop_core: CoOp (Context Optimization, Zhou et al.) on open_clip, framework-free.

Imports torch, torchvision, open_clip, pyarrow, numpy and PIL only: never ray, optuna or mlflow.
"""

from coop_core import datasets
from coop_core.backbone import LoadedClip, WeightsUnavailableError, load_clip
from coop_core.config import ModelConfig, PromptConfig, TrainConfig, default_epochs
from coop_core.datasets import (
    DatasetSplits,
    FolderSource,
    folder_source,
    list_datasets,
    load_dataset,
    load_folder_dataset,
)
from coop_core.distributed import ClassSharding, DataSharding, SingleProcess, choose_text_sharding, text_sharding_for
from coop_core.engine import TrainState, evaluate, train
from coop_core.features import CachedViews, ExactImages, FeatureCache, FeatureSet
from coop_core.fewshot import FewShotSplits, build_few_shot, sample_few_shot
from coop_core.interpret import nearest_words, nearest_words_table
from coop_core.model import CoOpModel
from coop_core.pipeline import build_model, prepare_features, run_coop
from coop_core.presets import Preset, PublishedResult, get_preset, list_presets, published_results, register_preset
from coop_core.prompt_learner import PromptLearner
from coop_core.prompts_io import PromptMeta, load_prompts, save_prompts
from coop_core.text_encoder import TextEncoder
from coop_core.transfer import PromptTransferError, transfer_context
from coop_core.zeroshot import zeroshot_evaluate, zeroshot_text_features

__all__ = [
    "CachedViews", "ClassSharding", "CoOpModel", "DataSharding", "DatasetSplits", "ExactImages", "FeatureCache",
    "FeatureSet", "FewShotSplits", "FolderSource", "LoadedClip", "ModelConfig", "PromptConfig", "PromptLearner",
    "PromptMeta", "PromptTransferError", "SingleProcess", "TextEncoder", "TrainConfig", "TrainState",
    "WeightsUnavailableError", "build_few_shot", "build_model", "choose_text_sharding", "datasets", "default_epochs",
    "evaluate", "folder_source", "list_datasets", "load_clip", "load_dataset", "load_folder_dataset", "load_prompts",
    "nearest_words", "nearest_words_table", "prepare_features", "run_coop", "sample_few_shot", "save_prompts",
    "text_sharding_for", "train", "transfer_context", "zeroshot_evaluate", "zeroshot_text_features",
    "Preset", "PublishedResult", "get_preset", "list_presets", "published_results", "register_preset",
]
