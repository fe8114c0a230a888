from fastapi import APIRouter

from rlora.basemodels import list_base_models

from service.api.auth import TenantDep
from service.api.deps import SettingsDep
from service.api.schemas import ModelOut, Page

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(_tenant: TenantDep, settings: SettingsDep) -> Page[ModelOut]:
    return Page(data=[ModelOut(id=name) for name in list_base_models(settings.models_dir)])
