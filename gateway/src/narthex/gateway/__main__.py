"""`python -m narthex.gateway`: run the gateway."""

from narthex.common.serve import serve
from narthex.gateway.main import create_app
from narthex.gateway.settings import GatewaySettings

serve(GatewaySettings, create_app)
