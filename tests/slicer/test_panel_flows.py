"""The panel's flows (SFRSegmentation.py) end to end, with the real slicer-core scene, the real
`sfr` tool (worker mode, the default) and *fake* Qt widgets.

The fakes only hold values and record calls (no rendering, no Qt signals: the test calls the
slots and the timer's slot itself), so this does not test Qt or the .ui layout; it runs the
panel's own Python through its flows, which otherwise only a real Slicer would: one job at a
time, the output selector following the input volume, Close Scene with a job running, undo."""
import os
import sys
import time
import types

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed: run scripts/setup.sh")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here has no MRML classes (not slicer-core)", allow_module_level=True)

from conftest import MODULE_DIR, cli_path, library_path, oblique_matrix, phantom  # noqa: E402
from SFRSegmentationLib import scene as sc  # noqa: E402

M = oblique_matrix()


# ---------------------------------------------------------------------------------------------
# Fake widgets


class Widget:
    def __init__(self):
        self.enabled = True
        self.slots = {}
        self.toolTip = ""

    def connect(self, signal, slot):
        self.slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        for slot in self.slots.get(signal, []):
            slot(*args)


class Button(Widget):
    def click(self):
        if self.enabled:
            self.emit("clicked()")


class Combo(Widget):
    def __init__(self):
        super().__init__()
        self.items = []
        self.currentIndex = -1

    def addItem(self, label, data):
        self.items.append((label, data))
        if self.currentIndex < 0:
            self.currentIndex = 0

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def setCurrentIndex(self, i):
        changed = i != self.currentIndex
        self.currentIndex = i
        if changed:
            self.emit("currentIndexChanged(int)", i)

    def itemData(self, i):
        return self.items[i][1] if 0 <= i < len(self.items) else None


class PathEdit(Widget):
    def __init__(self):
        super().__init__()
        self.currentPath = ""
        self.filters = None
        self.nameFilters = []


class NodeSelector(Widget):
    def __init__(self):
        super().__init__()
        self.node = None

    def currentNode(self):
        return self.node

    def setCurrentNode(self, node):
        self.node = node
        self.emit("currentNodeChanged(vtkMRMLNode*)", node)


class CheckableSelector(Widget):
    def __init__(self):
        super().__init__()
        self.nodes = []

    def checkedNodes(self):
        return list(self.nodes)

    def setCheckState(self, node, state):
        if state and node not in self.nodes:
            self.nodes.append(node)


class Table(Widget):
    def __init__(self):
        super().__init__()
        self.rows = {}
        self.rowCount = 0
        self.selected = []

    def setRowCount(self, n):
        self.rowCount = n

    def setItem(self, row, col, item):
        self.rows.setdefault(row, {})[col] = item.text

    def selectRow(self, row):
        self.selected = [row]

    def selectionModel(self):
        table = self

        class Model:
            def selectedRows(self):
                return [types.SimpleNamespace(row=lambda r=r: r) for r in table.selected]

        return Model()

    def horizontalHeader(self):
        return types.SimpleNamespace(setStretchLastSection=lambda on: None)


class Check(Widget):
    def __init__(self, checked=False):
        super().__init__()
        self.checked = checked

    def setChecked(self, on):
        changed = bool(on) != self.checked
        self.checked = bool(on)
        if changed:
            self.emit("toggled(bool)", self.checked)


class Label(Widget):
    def __init__(self):
        super().__init__()
        self.text = ""
        self.styleSheet = ""


class Progress(Widget):
    def setValue(self, v):
        self.value = v

    def setMaximum(self, v):
        self.maximum = v

    def setFormat(self, f):
        self.format = f


class Log(Widget):
    def __init__(self):
        super().__init__()
        self.lines = []

    def appendPlainText(self, text):
        self.lines.append(text)


def make_ui():
    ui = types.SimpleNamespace()
    for name in ("modeComboBox", "methodComboBox", "presetComboBox", "normalizationComboBox"):
        setattr(ui, name, Combo())
    for name in ("libraryPathLineEdit", "modelsFolderLineEdit", "unlabeledFolderLineEdit", "samCheckpointLineEdit"):
        setattr(ui, name, PathEdit())
    for name in ("addPairButton", "removePairButton", "downloadSamButton", "trainButton", "cancelButton", "refreshModelsButton",
                 "importModelButton", "removeModelButton", "segmentButton", "undoSegmentButton", "fetchSamWeightsButton",
                 "installEngineButton"):
        setattr(ui, name, Button())
    for name in ("labeledVolumeSelector", "labeledSegmentationSelector", "inputVolumeSelector", "outputSegmentationSelector"):
        setattr(ui, name, NodeSelector())
    ui.unlabeledVolumesSelector = CheckableSelector()
    ui.labeledTable, ui.modelsTable = Table(), Table()
    for name in ("libraryStatusLabel", "statusLabel", "classMappingLabel", "trainStatusLabel", "presetTimeLabel", "samWeightsStatusLabel",
                 "installSourceLineEdit"):
        setattr(ui, name, Label())
    ui.progressBar = Progress()
    ui.logTextEdit = Log()
    ui.useSamCheckBox = Check(True)
    ui.missingAsBackgroundCheckBox = Check(False)
    for name in ("setupCollapsibleButton", "progressCollapsibleButton"):
        setattr(ui, name, types.SimpleNamespace(collapsed=True))
    return ui


# ---------------------------------------------------------------------------------------------
# Fake Qt modules, Slicer's application object, and the module under test


@pytest.fixture
def panel(monkeypatch, tmp_path):
    scene = slicer.vtkMRMLScene()
    qt = types.ModuleType("qt")

    class QTimer:
        def __init__(self):
            self.active = False

        def setInterval(self, ms):
            pass

        def setSingleShot(self, on):
            self.single = on

        def fire(self):
            if self.active:
                self.active = not getattr(self, "single", False)
                self.slot()

        def connect(self, signal, slot):
            self.slot = slot

        def start(self):
            self.active = True

        def stop(self):
            self.active = False

        @staticmethod
        def singleShot(ms, slot):
            slot()

    settings = {}
    reloaded = []

    class QSettings:
        def value(self, key):
            return settings.get(key)

        def setValue(self, key, value):
            settings[key] = value

    class QTableWidgetItem:
        def __init__(self, text):
            self.text = text

        def setToolTip(self, text):
            pass

    qt.QTimer, qt.QSettings, qt.QTableWidgetItem = QTimer, QSettings, QTableWidgetItem
    qt.Qt = types.SimpleNamespace(Checked=2, Unchecked=0)
    ctk = types.ModuleType("ctk")
    ctk.ctkPathLineEdit = types.SimpleNamespace(Files=1, Dirs=2)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.layout = types.SimpleNamespace(addWidget=lambda w: None)

        def setup(self):
            pass

        def resourcePath(self, path):
            return str(MODULE_DIR / "Resources" / path)

        def onReload(self):
            # Slicer's reload re-imports the module file only.
            reloaded.append(sorted(m for m in sys.modules if m.startswith("SFRSegmentationLib")))

    slm.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {"__init__": lambda self, parent: None})
    slm.ScriptedLoadableModuleLogic = type("ScriptedLoadableModuleLogic", (), {"__init__": lambda self: None})
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", ctk)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(
        defaultScenePath=str(tmp_path), temporaryPath=str(tmp_path), cachePath=str(tmp_path)), raising=False)
    ui = make_ui()
    errors = []
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: types.SimpleNamespace(setMRMLScene=lambda s: None), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda w: ui, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *a, **k: errors.append(text), raising=False)
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, *a, **k: errors.append(text), raising=False)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}, raising=False)
    monkeypatch.setenv("SFR_CLI", str(cli_path()))
    monkeypatch.setenv("SFR_LIBRARY", str(library_path()))
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    sys.modules.pop("SFRSegmentation", None)
    import SFRSegmentation as module

    settings["SFRSegmentation/modelsFolder"] = str(tmp_path / "models")
    settings["SFRSegmentation/preset"] = "test-tiny"
    widget = module.SFRSegmentationWidget()
    widget.setup()
    widget.errors = errors
    widget.reloaded = reloaded
    widget.scene = scene
    yield widget
    widget.cleanup()
    sys.modules.pop("SFRSegmentation", None)
    scene.Clear(1)


def spin(widget, until, timeout=600.0):
    # As generous as conftest.run_to_end: on a shared 2-core machine the tiny training alone
    # took over 3 minutes.
    t0 = time.time()
    while not until():
        widget.onTimer()
        time.sleep(0.05)
        assert time.time() - t0 < timeout, widget.ui.statusLabel.text
        assert not widget.errors, widget.errors


def labelled_scene(widget, n=2):
    # Train stays disabled until Setup has checked the tool (on a helper thread).
    spin(widget, lambda: widget.libraryCheck is None, timeout=60)
    scene = widget.scene
    for seed in range(n):
        image, label = phantom(seed)
        v = sc.add_volume(scene, image, M, f"labelled{seed}")
        s = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"labels{seed}")
        sc.apply_labels(label, v, {0: "background", 1: "blob"}, s)
        widget.ui.labeledVolumeSelector.setCurrentNode(v)
        widget.ui.labeledSegmentationSelector.setCurrentNode(s)
        widget.ui.addPairButton.click()
    widget.ui.unlabeledVolumesSelector.nodes = [sc.add_volume(scene, phantom(5)[0], M, "unlabelled")]


def test_panel_opens_in_worker_mode_and_checks_the_tool_off_thread(panel):
    ui = panel.ui
    assert ui.modeComboBox.itemData(ui.modeComboBox.currentIndex) == "worker"
    assert "checking its version" in ui.libraryStatusLabel.text
    spin(panel, lambda: panel.libraryCheck is None, timeout=60)
    assert ui.libraryStatusLabel.text.startswith("SFR 0.1.") and "separate worker process" in ui.libraryStatusLabel.text
    ui.modeComboBox.setCurrentIndex(ui.modeComboBox.findData("in-process"))
    assert "loaded when the first job starts" in ui.libraryStatusLabel.text and "Warning" in ui.libraryStatusLabel.text
    assert panel.logic.sfr._library is None  # choosing the mode loaded nothing


def test_train_then_segment_one_job_at_a_time(panel):
    ui = panel.ui
    labelled_scene(panel)
    assert ui.labeledTable.rowCount == 2 and ui.trainButton.enabled
    ui.trainButton.click()
    assert panel.busy and not ui.trainButton.enabled and not ui.segmentButton.enabled and ui.cancelButton.enabled
    # "Automatic" intensities on volumes that did not come from DICOM: the library's auto.
    assert panel.collectorOptions["normalization"] == "auto"
    assert any("intensities: the labelled images carry no DICOM modality" in line for line in ui.logTextEdit.lines), ui.logTextEdit.lines
    collector = panel.collector
    ui.trainButton.click()  # a second click while busy starts nothing
    assert panel.collector is collector and panel.job is None
    spin(panel, lambda: not panel.busy)
    assert any("model saved as" in line for line in ui.logTextEdit.lines), ui.logTextEdit.lines
    assert len(panel.modelEntries) == 1 and ui.modelsTable.selected == [0]

    image, truth = phantom(11)
    target = sc.add_volume(panel.scene, image, M, "target")
    other = sc.add_volume(panel.scene, phantom(12)[0], M, "other")
    ui.inputVolumeSelector.setCurrentNode(target)
    assert ui.outputSegmentationSelector.currentNode() is None  # create new
    assert ui.segmentButton.enabled
    ui.segmentButton.click()
    assert panel.busy and not ui.segmentButton.enabled and not ui.trainButton.enabled
    ui.segmentButton.click()
    spin(panel, lambda: not panel.busy)
    result = ui.outputSegmentationSelector.currentNode()
    assert result is not None and result.GetName() == "target SFR"
    names = [result.GetSegmentation().GetSegment(s).GetName() for s in result.GetSegmentation().GetSegmentIDs()]
    assert names == ["blob"]
    # The output follows the input: the next volume does not land in "target SFR".
    ui.inputVolumeSelector.setCurrentNode(other)
    assert ui.outputSegmentationSelector.currentNode() is None
    ui.inputVolumeSelector.setCurrentNode(target)
    assert ui.outputSegmentationSelector.currentNode() is result
    # Undo removes the created node.
    assert ui.undoSegmentButton.enabled
    ui.undoSegmentButton.click()
    assert panel.busy and not ui.segmentButton.enabled  # one segment per tick
    spin(panel, lambda: not panel.busy)
    assert result.GetScene() is None and not ui.undoSegmentButton.enabled
    assert any("segments blob removed" in line for line in ui.logTextEdit.lines)


def test_close_scene_during_a_segmentation_discards_its_result(panel):
    ui = panel.ui
    labelled_scene(panel)
    ui.trainButton.click()
    spin(panel, lambda: not panel.busy)
    target = sc.add_volume(panel.scene, phantom(11)[0], M, "target")
    ui.inputVolumeSelector.setCurrentNode(target)
    ui.segmentButton.click()
    assert panel.task is not None and panel.busy  # the volume is read a slab per tick first
    spin(panel, lambda: panel.job is not None)
    panel.scene.Clear(0)  # File > Close Scene: fires StartCloseEvent / EndCloseEvent
    assert ui.labeledTable.rowCount == 0 and len(panel.pairs) == 0 and panel.undoStack == []
    fresh = sc.add_volume(panel.scene, phantom(3)[0], M, "fresh")  # may reuse the old IDs
    t0 = time.time()
    while panel.busy and time.time() - t0 < 120:
        panel.onTimer()
        time.sleep(0.05)
    assert not panel.busy
    assert panel.errors and "removed from the scene" in panel.errors[-1]
    assert panel.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert fresh.GetScene() is not None

    # Close Scene between two GUI-thread slices of adding a result: discarded the same way.
    panel.errors.clear()
    ui.inputVolumeSelector.setCurrentNode(fresh)
    ui.segmentButton.click()
    spin(panel, lambda: panel.job is None and panel.task is not None and panel.task.what.startswith("adding"))
    panel.onTimer()  # the first slice: checks, the labels go to a helper thread
    assert panel.busy and panel.task.slices == 1
    panel.scene.Clear(0)
    t0 = time.time()
    while panel.busy and time.time() - t0 < 60:
        panel.onTimer()
        time.sleep(0.01)
    assert not panel.busy
    assert panel.errors and "removed from the scene" in panel.errors[-1]
    assert panel.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_cancel_while_gathering_and_close_scene_while_gathering(panel):
    ui = panel.ui
    labelled_scene(panel)
    ui.trainButton.click()
    assert panel.collector is not None
    ui.cancelButton.click()
    assert not panel.busy and ui.trainButton.enabled
    ui.trainButton.click()
    panel.onTimer()  # one volume gathered
    panel.scene.Clear(0)
    assert not panel.busy and "scene was closed" in ui.statusLabel.text
    assert not ui.trainButton.enabled  # no pairs left
    assert panel.errors == []


# ---------------------------------------------------------------------------------------------
# Errors up front (issue 35, item 2) and the class mapping in the panel (item 1)


def test_train_is_disabled_with_the_reason_until_setup_is_ready(panel, monkeypatch, tmp_path):
    ui = panel.ui
    real_cli = str(cli_path())
    labelled_scene(panel)
    # The version check is still running (or just finished): never enabled before it is done.
    if panel.libraryCheck is not None:
        assert not ui.trainButton.enabled and "checking the sfr tool" in ui.trainStatusLabel.text
    spin(panel, lambda: panel.libraryCheck is None, timeout=60)
    assert ui.trainButton.enabled and ui.trainStatusLabel.text == ""

    # A tool that is missing: disabled, the reason shown, nothing gathered on a click.
    monkeypatch.setenv("SFR_CLI", str(tmp_path / "nowhere" / "sfr"))
    panel.onLibrarySettingsChanged()
    assert not ui.trainButton.enabled and not ui.segmentButton.enabled
    assert "Setup is not ready" in ui.trainStatusLabel.text and "nowhere" in ui.trainStatusLabel.text
    assert ui.trainButton.toolTip == ui.trainStatusLabel.text
    panel.onTrain()  # e.g. from a script: refused before any volume is gathered
    assert panel.collector is None and panel.errors and "nowhere" in panel.errors[-1]
    panel.errors.clear()

    # A tool of another version: refused once its `--version` has run (on a helper thread).
    fake = tmp_path / "sfr"
    fake.write_text("#!/bin/sh\necho 'sfr 9.9.9'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SFR_CLI", str(fake))
    panel.onLibrarySettingsChanged()
    assert not ui.trainButton.enabled and "checking the sfr tool" in ui.trainStatusLabel.text
    t0 = time.time()
    while panel.libraryCheck is not None and time.time() - t0 < 30:
        panel.onTimer()
        time.sleep(0.02)
    assert not ui.trainButton.enabled and "9.9.9" in ui.trainStatusLabel.text

    monkeypatch.setenv("SFR_CLI", real_cli)
    panel.onLibrarySettingsChanged()
    spin(panel, lambda: panel.libraryCheck is None, timeout=60)
    assert ui.trainButton.enabled, ui.trainStatusLabel.text


def test_path_fields_are_debounced(panel, monkeypatch):
    ui = panel.ui
    spin(panel, lambda: panel.libraryCheck is None, timeout=60)
    built = []
    original = panel.logic.sfr.__class__.check
    monkeypatch.setattr(panel.logic.sfr.__class__, "check", lambda self: built.append(self) or original(self))
    logic = panel.logic
    for text in ("/", "/o", "/op", "/opt/libsfr.so"):  # typing: one signal per keystroke
        ui.libraryPathLineEdit.currentPath = text
        ui.libraryPathLineEdit.emit("currentPathChanged(QString)", text)
    assert panel.logic is logic and built == [] and panel.libraryCheck is None  # nothing rebuilt, nothing run
    assert not ui.trainButton.enabled  # meanwhile the set-up is not known to be ready
    assert panel.settingsTimer.active
    panel.settingsTimer.fire()  # typing paused: applied once
    assert panel.logic is not logic and not panel.settingsTimer.active
    assert panel.libraryCheck is not None and "checking the sfr tool" in ui.trainStatusLabel.text
    spin(panel, lambda: panel.libraryCheck is None, timeout=60)
    assert len(built) == 1  # one `sfr --version` for the whole edit
    # The models folder: listed once typing pauses, not per keystroke.
    listed = []
    monkeypatch.setattr(panel, "refreshModels", lambda *a, **k: listed.append(ui.modelsFolderLineEdit.currentPath))
    for text in ("/t", "/tm", "/tmp"):
        ui.modelsFolderLineEdit.currentPath = text
        ui.modelsFolderLineEdit.emit("currentPathChanged(QString)", text)
    assert listed == [] and panel.modelsFolderTimer.active
    panel.modelsFolderTimer.fire()
    assert listed == ["/tmp"]


def test_class_mapping_is_shown_and_a_missing_segment_blocks_training(panel):
    ui = panel.ui
    spin(panel, lambda: panel.libraryCheck is None, timeout=60)
    scene = panel.scene
    image, label = phantom(0)
    v0 = sc.add_volume(scene, image, M, "v0")
    s0 = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s0")
    sc.apply_labels(label, v0, {1: "Liver"}, s0)
    other = (label == 0).astype("uint8")
    other[:] = 0
    other[0:3, 0:3, 0:3] = 1
    sc.apply_labels(other, v0, {1: "spleen"}, s0)
    v1 = sc.add_volume(scene, phantom(1)[0], M, "v1")
    s1 = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s1")
    sc.apply_labels(phantom(1)[1], v1, {1: " liver"}, s1)
    for v, s in ((v0, s0), (v1, s1)):
        ui.labeledVolumeSelector.setCurrentNode(v)
        ui.labeledSegmentationSelector.setCurrentNode(s)
        ui.addPairButton.click()
    assert "has no segment for class 'spleen'" in ui.classMappingLabel.text and "'s1' on 'v1'" in ui.classMappingLabel.text
    assert not ui.trainButton.enabled and "'spleen'" in ui.trainStatusLabel.text
    ui.missingAsBackgroundCheckBox.setChecked(True)  # the explicit choice
    assert ui.classMappingLabel.text.startswith("Classes: 1 Liver; 2 spleen")
    assert "counted as background" in ui.classMappingLabel.text
    assert ui.trainButton.enabled


# ---------------------------------------------------------------------------------------------
# Cancel at every stage leaves a consistent state (item 4); temporary files in Slicer's
# temporary folder (item 5)


def _job_folders(root):
    return sorted(p.name for p in (root / "SFRSegmentation").glob("sfr-*")) if (root / "SFRSegmentation").is_dir() else []


def _settle(panel, root, timeout=60):
    # Job threads remove their folders when the worker process has ended (after a cancel, within
    # the tool's grace period).
    t0 = time.time()
    while _job_folders(root) and time.time() - t0 < timeout:
        panel.onTimer()
        time.sleep(0.1)
    return _job_folders(root)


def test_temporary_files_go_to_slicers_temporary_folder(panel, tmp_path):
    ui = panel.ui
    spin(panel, lambda: panel.libraryCheck is None, timeout=60)
    assert panel.logic.sfr.work_root == str(tmp_path / "SFRSegmentation")
    labelled_scene(panel)
    ui.trainButton.click()
    spin(panel, lambda: panel.job is not None)
    # The cases were written one by one into Slicer's temporary folder while they were gathered.
    [folder] = _job_folders(tmp_path)
    images = sorted((tmp_path / "SFRSegmentation" / folder / "data" / "imagesTr").iterdir())
    assert [p.name[:5] for p in images] == ["L0000", "L0001", "U0000"]
    spin(panel, lambda: not panel.busy)
    assert any("model saved as" in line for line in ui.logTextEdit.lines)
    assert _settle(panel, tmp_path) == []  # nothing left once the model is in the models folder


def test_cancel_while_the_training_runs(panel, tmp_path):
    ui = panel.ui
    spin(panel, lambda: panel.libraryCheck is None, timeout=60)
    labelled_scene(panel)
    ui.trainButton.click()
    spin(panel, lambda: panel.job is not None)
    ui.cancelButton.click()
    assert not ui.cancelButton.enabled
    spin(panel, lambda: not panel.busy)
    assert any("training cancelled" in line for line in ui.logTextEdit.lines), ui.logTextEdit.lines
    assert panel.registry().list() == [] and _settle(panel, tmp_path) == []
    assert ui.trainButton.enabled


def test_cancel_after_the_training_finished_closes_the_model(panel, tmp_path):
    ui = panel.ui
    spin(panel, lambda: panel.libraryCheck is None, timeout=60)
    labelled_scene(panel)
    ui.trainButton.click()
    # The job has finished and its model is being taken (the tick before it is saved).
    spin(panel, lambda: panel.job is None and panel.task is not None and panel.task.what == "training")
    ui.cancelButton.click()
    spin(panel, lambda: not panel.busy)
    assert any("training cancelled" in line for line in ui.logTextEdit.lines), ui.logTextEdit.lines
    assert panel.registry().list() == []
    assert _settle(panel, tmp_path) == [], "the trained model's temporary folder was left behind"


def test_cancel_while_the_model_is_saved_keeps_it_and_says_so(panel, tmp_path):
    ui = panel.ui
    spin(panel, lambda: panel.libraryCheck is None, timeout=60)
    labelled_scene(panel)
    ui.trainButton.click()
    spin(panel, lambda: panel.task is not None and panel.task.what == "saving the model")
    ui.cancelButton.click()
    assert panel.busy and not ui.cancelButton.enabled
    assert any("saving the model cannot be interrupted: it finishes and is kept" in line for line in ui.logTextEdit.lines)
    spin(panel, lambda: not panel.busy)
    assert any("model saved as" in line for line in ui.logTextEdit.lines)
    assert not any("saving the model cancelled" in line for line in ui.logTextEdit.lines)
    assert len(panel.registry().list()) == 1 and ui.modelsTable.rowCount == 1  # the list was refreshed
    assert _settle(panel, tmp_path) == []


def test_cancel_while_gathering_removes_the_files_written_so_far(panel, tmp_path):
    ui = panel.ui
    spin(panel, lambda: panel.libraryCheck is None, timeout=60)
    labelled_scene(panel)
    ui.trainButton.click()
    # Until the first case has been written.
    spin(panel, lambda: any((tmp_path / "SFRSegmentation").glob("sfr-train-*/data/imagesTr/L0000*")))
    assert panel.collector is not None
    ui.cancelButton.click()
    assert not panel.busy
    assert _settle(panel, tmp_path, timeout=10) == []


def test_reload_also_reloads_the_lib(panel):
    import SFRSegmentationLib.scene as before

    # The other tests hold the current Lib modules: they are put back afterwards.
    saved = {n: m for n, m in sys.modules.items() if n.startswith("SFRSegmentationLib")}
    try:
        panel.onReload()
        assert panel.reloaded == [[]]  # the Lib's modules were dropped before Slicer re-imports the module
        import SFRSegmentationLib.scene as after

        assert after is not before
    finally:
        for n in [n for n in sys.modules if n.startswith("SFRSegmentationLib")]:
            del sys.modules[n]
        sys.modules.update(saved)


def test_preset_default_and_its_expected_time(panel):
    import SFRSegmentationLib as sl

    ui = panel.ui
    # The fixture chose test-tiny; the Lib's one function decides the default for a first use.
    assert ui.presetComboBox.itemData(ui.presetComboBox.currentIndex) == "test-tiny"
    assert ui.presetTimeLabel.text == sl.preset_expected_time("test-tiny") and "Seconds" in ui.presetTimeLabel.text
    ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findData(sl.default_preset()))
    assert ui.presetTimeLabel.text == sl.preset_expected_time(sl.default_preset()) != ""
    ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findData("cpu-lora"))
    assert "minutes" in ui.presetTimeLabel.text


def test_sam_weights_state_and_the_warning_before_training(panel, monkeypatch, tmp_path):
    ui = panel.ui
    spin(panel, lambda: panel.samWeightsCheck is None, timeout=60)
    # A cache without LiteMedSAM (the worker's environment decides where the tool looks).
    monkeypatch.setattr(panel.logic.sfr, "env", {"PATH": os.environ.get("PATH", ""), "SFR_CACHE": str(tmp_path / "cache")})
    panel.checkSamWeights()
    spin(panel, lambda: panel.samWeightsCheck is None, timeout=60)
    assert "not in the cache" in ui.samWeightsStatusLabel.text and ui.fetchSamWeightsButton.enabled
    assert panel.samWeightsOk is False
    labelled_scene(panel)
    ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findData("cpu-small"))
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, *a, **k: asked.append(text) or False, raising=False)
    ui.trainButton.click()
    assert asked and "RANDOM weights" in asked[0] and "Fetch LiteMedSAM" in asked[0]
    assert panel.collector is None and not panel.busy  # declined: nothing gathered
    assert any("RANDOM weights" in line for line in ui.logTextEdit.lines)
    # Smoke test: never pretrained, no question.
    asked.clear()
    ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findData("test-tiny"))
    ui.trainButton.click()
    assert asked == [] and panel.collector is not None
    ui.cancelButton.click()


def test_worker_warnings_reach_the_panel_log(panel):
    ui = panel.ui
    labelled_scene(panel)
    ui.trainButton.click()
    spin(panel, lambda: not panel.busy)
    # test-tiny's SAM starts from random weights: the tool warns, and the warning outlives the
    # worker's temporary folder (removed on success).
    assert any(line.split("  ", 1)[1].startswith("warning from the training: NO SAM CHECKPOINT") for line in ui.logTextEdit.lines), ui.logTextEdit.lines


def test_the_panels_state_is_the_scenes_parameter_node(panel):
    from SFRSegmentationLib.parameters import SFRParameters

    ui = panel.ui
    labelled_scene(panel)
    params = SFRParameters.of_scene(panel.scene)  # what a script would use
    assert params.node is panel.params.node and len(params.pairs()) == 2
    params.preset = "cpu-lora"  # set from a script: the panel follows
    assert ui.presetComboBox.itemData(ui.presetComboBox.currentIndex) == "cpu-lora"
    assert "minutes" in ui.presetTimeLabel.text
    ui.methodComboBox.setCurrentIndex(ui.methodComboBox.findData("acmt"))  # set in the panel: the node follows
    ui.missingAsBackgroundCheckBox.setChecked(True)
    assert params.method == "acmt" and params.missing_as_background
    # Intensities: the node follows the panel, and the panel's choice reaches the training config.
    assert params.normalization == "auto"
    ui.normalizationComboBox.setCurrentIndex(ui.normalizationComboBox.findData("ct"))
    assert params.normalization == "ct"
    params.normalization = "zscore"
    assert ui.normalizationComboBox.itemData(ui.normalizationComboBox.currentIndex) == "zscore"
    panel.exit()  # the module is left: no more observation
    params.preset = "test-tiny"
    assert ui.presetComboBox.itemData(ui.presetComboBox.currentIndex) == "cpu-lora"
    panel.enter()
    assert ui.presetComboBox.itemData(ui.presetComboBox.currentIndex) == "test-tiny"
    panel.ui.removePairButton.click()  # nothing selected: nothing removed
    assert len(params.pairs()) == 2
    # The unlabelled volumes ticked for a training are saved in the node and ticked again.
    ui.unlabeledVolumesSelector.nodes = []
    params.set_unlabeled([n for n, _ in params.pairs()][:1])
    assert ui.unlabeledVolumesSelector.checkedNodes() == [params.pairs()[0][0]]
    panel.scene.Clear(0)  # Close Scene (keeps singleton nodes, reset): no cases left, the panel observes the node again
    assert panel.params is not None and len(panel.pairs) == 0 and panel.params.preset in sl_presets()
    panel.params.preset = "cpu-small"
    assert ui.presetComboBox.itemData(ui.presetComboBox.currentIndex) == "cpu-small"


def sl_presets():
    import SFRSegmentationLib as sl

    return sl.PRESETS


def test_install_sfr_runs_in_the_background_then_checks_the_installed_tool(panel, monkeypatch):
    import SFRSegmentationLib as sl

    ui = panel.ui
    spin(panel, lambda: panel.libraryCheck is None, timeout=120)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True, raising=False)
    runs = []

    class FakeInstall:
        """Finishes on its third poll; the real pip run is tested in test_install.py and
        scripts/test_wheel.sh."""

        def __init__(self, source, python=None):
            self.source, self.polls, self.result = source, 0, None
            runs.append(self)

        def start(self):
            return self

        def poll(self):
            self.polls += 1
            done = self.polls >= 3
            if done:
                self.result = {"cli": cli_path(), "library": library_path(), "version": "0.1.0"}
            return {"finished": done, "error": None, "stage": "Processing wheel"}

    monkeypatch.setattr(sl, "EngineInstall", FakeInstall)
    ui.installSourceLineEdit.text = "/wheels/sfr_segmentation-0.1.0-py3-none-manylinux_2_34_x86_64.whl"
    ui.installEngineButton.click()
    assert runs and runs[0].source == ui.installSourceLineEdit.text
    assert not ui.installEngineButton.enabled and not ui.trainButton.enabled
    panel.timer.fire()
    assert "Installing SFR: Processing wheel" in ui.libraryStatusLabel.text
    spin(panel, lambda: panel.engineInstall is None and panel.libraryCheck is None, timeout=120)
    assert ui.installEngineButton.enabled
    assert any("SFR 0.1.0 installed" in line for line in ui.logTextEdit.lines)
    assert ui.libraryStatusLabel.text.startswith("SFR 0.1.0"), ui.libraryStatusLabel.text  # the tool was checked again

    # A failed install: the error is shown, Setup is not ready.
    class FailedInstall(FakeInstall):
        def poll(self):
            return {"finished": True, "error": "pip install x failed (exit 1): no such file", "stage": ""}

    monkeypatch.setattr(sl, "EngineInstall", FailedInstall)
    ui.installEngineButton.click()
    panel.onTimer()  # the first poll finds it finished (spin() would stop at the error dialog)
    assert panel.engineInstall is None and ui.installEngineButton.enabled
    assert panel.errors and "could not be installed" in panel.errors[-1]
    assert "could not be installed" in ui.libraryStatusLabel.text and not panel.setupReady
