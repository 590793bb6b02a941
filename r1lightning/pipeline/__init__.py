"""`r1lightning pipeline -c pipeline.yaml`: run training stages in order, each feeding the next.

- `spec.py`: the pipeline file (stages, how they connect) and its checks;
- `compose.py`: one stage's config from its recipes and the stages before it (dict in, dict out);
- `run.py`: running the stages (skip finished ones, resume interrupted ones) and the command line;
- `report.py`: the summary table, JSON and plot.
"""

from r1lightning.pipeline.compose import config_hash, get_dotted, merge, set_dotted
from r1lightning.pipeline.report import final_model, plot, read_metrics, summarize
from r1lightning.pipeline.run import check_configs, main, produced_datasets, run_pipeline, run_stage, stage_config
from r1lightning.pipeline.spec import Pipeline, PipelineError, Stage, load_pipeline, parse_override

__all__ = ["Pipeline", "PipelineError", "Stage", "check_configs", "config_hash", "final_model", "get_dotted", "load_pipeline",
           "main", "merge", "parse_override", "plot", "produced_datasets", "read_metrics", "run_pipeline", "run_stage",
           "set_dotted", "stage_config", "summarize"]
