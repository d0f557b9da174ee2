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
OPACITY = "overlay-opacity"
SMOOTH = "overlay-smooth"
CLEAR_SELECTION = "clear-selection"

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
