"""Reason codes for face decisions, with plain-language messages for the kiosk screen."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a face check ended the way it did (also the `reason` of face.decision events)."""

    OK = "ok"
    NO_FACE = "no_face"
    SEVERAL_FACES = "several_faces"
    FACE_CUT_OFF = "face_cut_off"
    FACE_TOO_SMALL = "face_too_small"
    TOO_DARK = "too_dark"
    TOO_BRIGHT = "too_bright"
    TURNED_AWAY = "turned_away"
    TOO_BLURRED = "too_blurred"
    NOT_SAME_PERSON = "not_same_person"
    NOT_IN_GALLERY = "not_in_gallery"


MESSAGES: dict[Reason, tuple[str, str]] = {
    Reason.OK: ("验证完成", "Check complete"),
    Reason.NO_FACE: ("未检测到人脸，请正对摄像头", "No face found: please look at the camera"),
    Reason.SEVERAL_FACES: (
        "检测到多张人脸，请确保只有您本人在镜头前",
        "Several faces found: please make sure only you are in front of the camera",
    ),
    Reason.FACE_CUT_OFF: (
        "人脸不完整，请将整张脸置于画面中央",
        "Your face is not fully in view: please centre it in the frame",
    ),
    Reason.FACE_TOO_SMALL: (
        "人脸太小，请靠近摄像头",
        "Face too small: please come closer to the camera",
    ),
    Reason.TOO_DARK: ("光线太暗，请调整位置或光线", "Too dark: please move into better light"),
    Reason.TOO_BRIGHT: ("光线太亮，请避开强光", "Too bright: please move away from strong light"),
    Reason.TURNED_AWAY: (
        "请正对摄像头，不要侧脸或歪头",
        "Please face the camera directly, without turning or tilting your head",
    ),
    Reason.TOO_BLURRED: ("图像模糊，请保持不动", "Image too blurred: please hold still"),
    Reason.NOT_SAME_PERSON: ("人脸比对未通过", "The faces do not match"),
    Reason.NOT_IN_GALLERY: ("未找到匹配的登记人脸", "No enrolled face matches"),
}


ID_PHOTO_PREFIX = "id_photo_"


def message(reason: str) -> dict[str, str]:
    """Return the Chinese and English message for a reason code (generic text if unknown)."""
    if reason.startswith(ID_PHOTO_PREFIX):
        inner = message(reason[len(ID_PHOTO_PREFIX) :])
        return {"zh": "证件照片：" + inner["zh"], "en": "ID card photo: " + inner["en"]}
    try:
        zh, en = MESSAGES[Reason(reason)]
    except ValueError:
        zh, en = (
            "人脸验证未完成，请重试或使用其他方式登录",
            "Face check did not complete: please retry or log in another way",
        )
    return {"zh": zh, "en": en}
