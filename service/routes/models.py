from fastapi import APIRouter

from rlora.models import list_base_models

from ..auth import TenantDep
from ..deps import SettingsDep
from ..schemas import ModelOut, Page

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(_tenant: TenantDep, settings: SettingsDep) -> Page[ModelOut]:
    return Page(data=[ModelOut(id=name) for name in list_base_models(settings.models_dir)])
