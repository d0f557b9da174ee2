"""What every panel of the app needs: the database, the optional live model, and its settings."""
from dataclasses import dataclass, field
from typing import Any, Optional

from app.database.database import VliLmdb
from app.database.token_map import DEFAULT_MAX_TOKENS


@dataclass
class AppContext:
    db: VliLmdb
    model: Optional[Any] = None  # a VL_Model, when the app was started with -m
    allow_paths: bool = False  # may the page name server files or URLs for "Add example"
    jobs: Any = field(default=None)  # app.jobs.JobRunner when a model is loaded
    map_tokens: int = DEFAULT_MAX_TOKENS  # tokens sampled for the database-wide token map
