"""`python -m narthex.inference`: run the inference service."""

from narthex.common.serve import serve
from narthex.inference.main import create_app
from narthex.inference.settings import InferenceSettings

serve(InferenceSettings, create_app)
