"""Every Dash component id of the app, in one place, so that panels never repeat id strings."""

# Example navigation (owned by the example panel; other panels may set EXAMPLE_SELECT's value
# and options with allow_duplicate=True, e.g. after adding an example or following a neighbour).
EXAMPLE_SELECT = "example-select"
EXAMPLE_PREV = "example-prev"
EXAMPLE_NEXT = "example-next"
PREDICTION = "prediction"
EXAMPLE_COUNT = "example-count"  # the header's "N examples · L layers × H heads"

# "Add example" panel (live model).
ADD_UPLOAD = "add-upload"
ADD_PATH = "add-path"
ADD_TEXT = "add-text"
ADD_LABEL = "add-label"
ADD_SUBMIT = "add-submit"
ADD_STATUS = "add-status"
ADD_POLL = "add-poll"
ADD_JOB = "add-job"

# Stores (selection state shared by the panels).
SEL_STORE = "sel-store"  # {"ex": id, "tokens": [token indices]} the selected query tokens
HEAD_STORE = "head-store"  # {"layer": l (0-based), "head": h (0-based) or None for the mean of heads}
TOKEN_CLICK = "token-click"  # {"index": i, "t": time} written in the browser when a token is clicked
EXAMPLE_READY = "example-ready"  # example id whose token list and image figure are on the page
ATT_STORE = "att-store"  # attention of the selection to the text tokens, tinted in the browser
TSNE_READY = "tsne-ready"  # {"ex": id, "layer": l} of the t-SNE map on the page
NEIGHBOR_STORE = "neighbor-store"  # {"ex": id, "token": i} the nearest other-modality token

# Pattern-matching id types ({"type": ..., "index": token index}).
TOKEN = "token"  # a clickable token: text tokens and image-side special tokens (chips)

# Head summary panel.
HEAD_GRAPH = "head-graph"
HEAD_STAT = "head-stat"
HEAD_STAT_HELP = "head-stat-help"
HEAD_ZSCORE = "head-zscore"
HEAD_TITLE = "head-title"

# Tokens and image panel.
SIDE = "side"
PLAY = "play"
PLAY_INTERVAL = "play-interval"
TEXT_TOKENS = "text-tokens"
ATT_TITLE = "att-title"
IMAGE_GRAPH = "image-graph"
IMAGE_SPECIALS = "image-specials"
GRID_SWITCH = "grid-switch"  # which patch grid the image shows (examples with several grids)
GRID_SWITCH_WRAP = "grid-switch-wrap"
OPACITY = "overlay-opacity"
SMOOTH = "overlay-smooth"
CLEAR_SELECTION = "clear-selection"
PATCH_WORDS = "patch-words"  # checklist: draw the per-patch logit lens's words on the patches
PATCH_WORDS_LAYER = "patch-words-layer"  # the hidden-state layer of those words (0 = embeddings)
PATCH_WORDS_WRAP = "patch-words-wrap"  # their controls, shown only for an example with a per-patch lens

# Hidden states (t-SNE) and attention matrix panel.
VIEW_TABS = "view-tabs"
TSNE_GRAPH = "tsne-graph"
TSNE_LAYER = "tsne-layer"
TSNE_TOOLTIP = "tsne-tooltip"
NEIGHBOR_INFO = "neighbor-info"
NEIGHBOR_OPEN = "neighbor-open"
MATRIX_GRAPH = "matrix-graph"
MATRIX_KIND = "matrix-kind"

# "Add example" panel, more (helper C2).
ADD_FILE_INFO = "add-file-info"  # name and size of the uploaded image, or why it was refused
ADD_PANEL = "add-panel"  # the panel's section (present only when a model is loaded)
ADD_IMAGE = "add-image"  # the upload as checked in the browser: {"filename", "size", "contents" or None}

# Attention colour scale for the text tint (helper: page/panels), sent once with the page.
ATT_SCALE = "att-scale"  # figures.ATTENTION_SCALE, read by vli.tint
PAGE_ERROR = "page-error"  # the banner saying what failed in the current view (e.g. a damaged example)

# "Beyond raw attention" (helper: evidence views).
ATT_METHOD = "att-method"  # what the attention panel shows: "attention" (the selected head) or "rollout"
ATT_METHOD_HELP = "att-method-help"  # the chosen method's definition, under the switch
DISTANCE_GRAPH = "distance-graph"  # the hidden panel's mean attention distance tab (per layer and head)
LENS_GRAPH = "lens-graph"  # the logit lens tab: answers per layer
LENS_NOTE = "lens-note"  # why an example has no logit lens

# Dataset panel (helper: the whole database at a glance).
DATASET_TABLE = "dataset-table"  # the examples table (server-side paging, filtering and sorting)
DATASET_TEXT = "dataset-text"  # filter: a substring of the text
DATASET_ANSWER = "dataset-answer"  # filter: a substring of the prediction's answer or label
DATASET_CORRECT = "dataset-correct"  # filter: correct / incorrect / unknown / all
DATASET_LOW = "dataset-low"  # filter: the value column's lower bound
DATASET_HIGH = "dataset-high"  # filter: the value column's upper bound
DATASET_STAT = "dataset-stat"  # the statistic of the value column and of the dataset views
DATASET_LAYER = "dataset-layer"  # the value column's layer (0-based)
DATASET_HEAD = "dataset-head"  # the value column's head (0-based) or "mean" for the layer mean
DATASET_STATUS = "dataset-status"  # "N of M examples" or what was wrong with a filter
DATASET_FILTERED = "dataset-filtered"  # store: the filtered example ids, in table order
DATASET_PREV = "dataset-prev"  # previous example within the filtered ones
DATASET_NEXT = "dataset-next"  # next example within the filtered ones
DATASET_VIEW = "dataset-view"  # the dataset view: "mean" (heatmap) or "contrast"
DATASET_CONTRAST = "dataset-contrast"  # contrast groups: "correct" (correct vs incorrect) or "rest"
DATASET_GRAPH = "dataset-graph"  # the layers x heads heatmap (mean, or contrast)
DATASET_GRAPH_HELP = "dataset-graph-help"  # what the heatmap shows (and how many heads are significant)
DATASET_FOCUS = "dataset-focus"  # store: {"layer", "head", "ranked": [ex ids]} of the drill-down
DATASET_RANKED = "dataset-ranked"  # the drill-down: examples ranked by the clicked head's value
DATASET_OPEN = "dataset-open"  # pattern-matching type: {"type": DATASET_OPEN, "index": rank position}

# Interventions panel (live model: the stored example re-run with heads zeroed, patches removed, or
# another example's hidden states patched in).
IV_PANEL = "iv-panel"  # the panel's section (present only with a model that supports interventions)
IV_USE_SELECTED = "iv-use-selected"  # checklist: ablate the head summary's selection too
IV_HEADS = "iv-heads"  # multi-select of "layer-head" / "layer-all" values (0-based)
IV_ABLATE = "iv-ablate"  # button: run with the heads zeroed
IV_ABLATION = "iv-ablation"  # the top answers before / after the ablation
IV_DELETION = "iv-deletion"  # button: the deletion curve for the attention panel's method
IV_MASK = "iv-mask"  # button: remove the attention panel's selected patches
IV_DELETION_GRAPH = "iv-deletion-graph"  # the deletion curve
IV_MASKING = "iv-masking"  # what the deletion curve / the masking did (answers, or why not)
IV_CORRUPTED = "iv-corrupted"  # dropdown: the corrupted example of activation patching
IV_PATCH = "iv-patch"  # button: run activation patching
IV_PATCH_GRAPH = "iv-patch-graph"  # the layers x positions heatmap
IV_PATCH_HEADS_GRAPH = "iv-patch-heads-graph"  # the layers x heads heatmap of patching each head's output
IV_SWEEP = "iv-sweep"  # button: zero each head alone, every head (the head ablation sweep)
IV_SWEEP_GRAPH = "iv-sweep-graph"  # the sweep's layers x heads heatmap (a click selects the head)
IV_SWEEP_TEXT = "iv-sweep-text"  # what the sweep found
IV_JOB = "iv-job"  # store: {"kind": "sweep", "ex"} or {"kind": "patching", "ex", "corrupted"}: the run polled
IV_POLL = "iv-poll"  # interval polling the background run's progress
IV_RUN_STATUS = "iv-run-status"  # the background run's progress bar, or why it failed
IV_SWEEP_RUN = "iv-sweep-run"  # store: {"ex"} of the sweep shown
IV_PATCHING = "iv-patching"  # the clean and corrupted answers, or why patching was refused
IV_ABLATION_RUN = "iv-ablation-run"  # store: {"ex", "heads": IV_HEADS values} of the ablation shown
IV_CURVE_RUN = "iv-curve-run"  # store: {"ex", "method"} of the deletion curve shown
IV_MASK_RUN = "iv-mask-run"  # store: {"ex", "tokens"} of the patch removal shown (SEL_STORE's form)
IV_PATCHING_RUN = "iv-patching-run"  # store: {"ex", "corrupted"} of the activation patching shown
IV_SAVE_NOTE = "iv-save-note"  # button: save the results shown as notes on the example
IV_SAVE_STATUS = "iv-save-status"  # what was saved, or why not
# Downloads (app/export.py): one dcc.Download for every export, and the buttons that fill it.
DOWNLOAD = "download"
EXPORT_REPORT = "export-report"  # the example's one-file HTML report
EXPORT_ATTENTION = "export-attention"  # the attention row(s) shown, as CSV
EXPORT_STATISTICS = "export-statistics"  # every statistic of every head of the example, as CSV
EXPORT_MATRIX = "export-matrix"  # the selected head's attention matrix, as .npy
EXPORT_DATASET_TABLE = "export-dataset-table"  # the filtered examples (every column, in table order), as CSV
EXPORT_DATASET_VIEW = "export-dataset-view"  # the dataset heatmap's numbers per head (mean or contrast), as CSV
EXPORT_DATASET_RANKED = "export-dataset-ranked"  # the drill-down's ranked examples, as CSV
IMAGE_EXPORT = "image-export"  # pattern {"type": IMAGE_EXPORT, "graph": id, "format": "png" | "svg"}
IMAGE_EXPORT_DONE = "image-export-done"  # the clientside download's (unused) output
# Links that reopen a view (app/panels/links.py): the page state in the URL's query string.
URL = "url"  # dcc.Location: its search holds the view's state, one history entry per view
COPY_LINK = "copy-link"  # dcc.Clipboard: copies the page's address, which reopens this view
LINK_SHOWN = "link-shown"  # store: the search the page shows (written or restored), "" on opening
LINK_REQUEST = "link-request"  # store: a search to restore (a link opened, or back / forward)

# Token map panel (the whole database in one map of a layer's hidden states)
TOKEN_MAP_OPEN = "token-map-open"  # button: show the map (fitting it first if needed)
TOKEN_MAP_LAYER = "token-map-layer"  # the hidden-state layer mapped (0 = embeddings)
TOKEN_MAP_COLOUR = "token-map-colour"  # colour by: modality, word, correctness or example
TOKEN_MAP_GRAPH = "token-map-graph"
TOKEN_MAP_STATUS = "token-map-status"  # what is being fitted, or why it failed
TOKEN_MAP_PROGRESS = "token-map-progress"  # the fit's progress bar
TOKEN_MAP_POLL = "token-map-poll"  # interval polling a fit in the background
TOKEN_MAP_DRAWN = "token-map-drawn"  # store: {"layer", "key", "ring"} of the map drawn
