from fastapi import APIRouter
from sqlalchemy import text

from service.api.deps import SessionDep
from service.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health")
def health(session: SessionDep) -> Health:
    # Up means able to serve: the database answers.
    session.execute(text("SELECT 1"))
    return Health()
