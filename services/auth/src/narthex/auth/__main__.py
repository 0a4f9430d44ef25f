"""`python -m narthex.auth`: run the auth service."""

from narthex.auth.main import create_app
from narthex.auth.settings import AuthSettings
from narthex.common.serve import serve

serve(AuthSettings, create_app)
