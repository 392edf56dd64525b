"""Evaluation: recognition with frozen or fine-tuned MAGE features, and sample-quality metrics."""
from .frechet import efficientnet_features, fid_inception, frechet_distance, gaussian_stats, offline_frechet
from .recognition import (LARS, MAGEClassifier, extract_features, few_shot, finetune, fit_logistic_regression,
                          linear_probe, logistic_regression, param_groups_lrd, probe_head)

__all__ = ["efficientnet_features", "fid_inception", "frechet_distance", "gaussian_stats", "offline_frechet", "LARS",
           "MAGEClassifier", "extract_features", "few_shot", "finetune", "fit_logistic_regression", "linear_probe",
           "logistic_regression", "param_groups_lrd", "probe_head"]
