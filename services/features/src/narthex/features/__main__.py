"""`python -m narthex.features`: run the features service."""

from narthex.common.serve import serve
from narthex.features.main import create_app
from narthex.features.settings import FeaturesSettings

serve(FeaturesSettings, create_app)
