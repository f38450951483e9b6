"""The API's routes by area, each module a `register(app, ...)` that adds its routes to the app
itself (scheduler/api.py builds the app, its auth, errors and POLICY). Not APIRouter +
include_router: FastAPI 0.163 keeps an included router as one opaque entry of app.routes, and
create_app's check that every route has a POLICY entry reads app.routes."""
