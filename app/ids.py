"""Every Dash component id of the app, in one place, so that panels never repeat id strings."""

# Example navigation (owned by the example panel; other panels may set EXAMPLE_SELECT's value
# and options with allow_duplicate=True, e.g. after adding an example or following a neighbour).
EXAMPLE_SELECT = "example-select"
EXAMPLE_PREV = "example-prev"
EXAMPLE_NEXT = "example-next"
PREDICTION = "prediction"

# "Add example" panel (live model).
ADD_UPLOAD = "add-upload"
ADD_PATH = "add-path"
ADD_TEXT = "add-text"
ADD_LABEL = "add-label"
ADD_SUBMIT = "add-submit"
ADD_STATUS = "add-status"
ADD_POLL = "add-poll"
ADD_JOB = "add-job"
