"""coop_core: CoOp (Context Optimization, Zhou et al.) on open_clip, framework-free.

Imports torch, torchvision, open_clip, pyarrow, numpy and PIL only: never ray, optuna or mlflow.
"""

from coop_core import datasets
from coop_core.backbone import (
    NO_WEIGHTS,
    LoadedClip,
    WeightsDownloadError,
    WeightsUnavailableError,
    load_clip,
    resolve_model_name,
    weights_digest,
)
from coop_core.checks import check_run_inputs
from coop_core.config import MethodConfig, ModelConfig, PromptConfig, TrainConfig, default_epochs
from coop_core.datasets import (
    DatasetSplits,
    FolderSource,
    folder_source,
    list_datasets,
    load_dataset,
    load_folder_dataset,
)
from coop_core.distributed import (
    ClassSharding,
    DataSharding,
    Distributed,
    SingleProcess,
    choose_text_sharding,
    text_sharding_for,
)
from coop_core.engine import NonFiniteLossError, TrainState, evaluate, train
from coop_core.features import CachedViews, ExactImages, FeatureCache, FeatureSet, weights_identity
from coop_core.fewshot import FewShotSplits, build_few_shot, sample_few_shot
from coop_core.interpret import nearest_words, nearest_words_table
from coop_core.methods import Objective, make_objective
from coop_core.model import CoCoOpModel, CoOpModel
from coop_core.pack import MemberResult, PackMember, train_pack
from coop_core.pipeline import (
    FinalEvaluation,
    RunFeatures,
    build_model,
    build_objective,
    evaluate_final,
    evaluation_features,
    prepare_features,
    prompt_model,
    run_coop,
)
from coop_core.presets import Preset, PublishedResult, get_preset, list_presets, published_results, register_preset
from coop_core.prompt_learner import PromptLearner
from coop_core.prompts_io import (
    PromptFileError,
    PromptMeta,
    check_prompts_fit,
    load_prompts,
    prompt_digest,
    save_prompts,
    verified_digest,
)
from coop_core.text_encoder import TextEncoder, text_tower
from coop_core.transfer import PromptTransferError, check_transfer, classes_without_vectors, transfer_context
from coop_core.transforms import test_transform
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
    # what the platform uses besides: the checks before a run, weights, the run's pieces, prompt files, transfer
    "NO_WEIGHTS", "Distributed", "NonFiniteLossError", "PromptFileError", "RunFeatures", "WeightsDownloadError",
    "check_prompts_fit", "check_run_inputs", "check_transfer", "classes_without_vectors", "evaluation_features",
    "prompt_digest", "prompt_model", "resolve_model_name", "test_transform", "text_tower", "verified_digest",
    "weights_digest", "weights_identity", "FinalEvaluation", "evaluate_final",
    # the methods after CoOp on the same engine (coop_core.methods)
    "CoCoOpModel", "MethodConfig", "Objective", "build_objective", "make_objective",
    # many configurations in one text step on one CLIP (coop_core.pack)
    "MemberResult", "PackMember", "train_pack",
]
