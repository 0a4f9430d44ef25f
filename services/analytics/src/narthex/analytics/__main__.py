"""`python -m narthex.analytics`: run the analytics service."""

from narthex.analytics.main import create_app
from narthex.analytics.settings import AnalyticsSettings
from narthex.common.serve import serve

serve(AnalyticsSettings, create_app)
