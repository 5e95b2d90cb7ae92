"""Images over the API: who uses them, deletion refused while in use, raw images for VMs only."""

from __future__ import annotations

from bitbuilder.hostshim.api import ImageType
from tests.shim.conftest import FakeShim, machine_spec, status


def test_images_list_their_users_and_an_image_in_use_is_not_deleted(fake_shim: FakeShim) -> None:
    client = fake_shim.client
    client.request("PUT", "/v1/images/spare", {"path": "/srv/images/spare"})
    assert status(client.put(machine_spec()).body).phase == "Running"
    listed = {i["name"]: i["usedBy"] for i in client.request("GET", "/v1/images").body["items"]}
    assert listed == {"base": ["web"], "spare": []}
    assert client.request("GET", "/v1/images/base").body["usedBy"] == ["web"]
    reply = client.request("DELETE", "/v1/images/base")
    assert reply.status == 409 and reply.body["error"] == "ImageInUse"
    assert "web" in reply.body["message"]
    assert "base" in fake_shim.images.images
    assert client.request("DELETE", "/v1/images/spare").status == 200
    assert "spare" not in fake_shim.images.images
    assert client.delete("web").status == 200
    assert client.request("DELETE", "/v1/images/base").status == 200
    assert client.request("GET", "/v1/images/base").body["error"] == "ImageNotFound"


def test_a_raw_image_is_refused_for_a_container_before_it_is_stopped(fake_shim: FakeShim) -> None:
    first = status(fake_shim.client.put(machine_spec()).body)
    raw = fake_shim.images.get("base").model_copy(update={"name": "disk", "type": ImageType.raw})
    fake_shim.images.images["disk"] = raw
    st = status(fake_shim.client.put(machine_spec(image="disk")).body)
    assert st.machine_error is not None and st.machine_error.reason == "ImageTypeUnsupported"
    assert st.phase == "Running" and st.leader_pid == first.leader_pid
    assert fake_shim.runner.stops == []
