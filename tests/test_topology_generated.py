"""Topology reading on generated sysfs trees (self-contained) and its pure parsers."""
from __future__ import annotations

import shutil

import pytest
from sysfs_tree import write_sysfs_tree

from numabench.errors import TopologyError
from numabench.topology import (
    format_cpulist,
    machine_from_dict,
    machine_to_dict,
    parse_cpulist,
    parse_cpumask,
    parse_lscpu,
    read_machine,
    render_machine,
)

CPU = "sys/devices/system/cpu"
NODE = "sys/devices/system/node"


# --- parsers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, cpus", [
    ("0-3,8", (0, 1, 2, 3, 8)), ("", ()), ("5\n", (5,)), ("(null)", ()), ("8,0-1", (0, 1, 8)),
    ("0-7:2/4", (0, 1, 4, 5)),
])
def test_parse_cpulist(text, cpus):
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize("text", ["0-", "a", "3-1", "0,,1x", "0-3:5/4"])
def test_parse_cpulist_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_cpulist(text)


def test_format_cpulist_round_trips():
    assert format_cpulist((0, 1, 2, 3, 8)) == "0-3,8"
    assert format_cpulist(()) == ""
    assert parse_cpulist(format_cpulist((9, 1, 2, 40))) == (1, 2, 9, 40)


def test_parse_cpumask_words_most_significant_first():
    assert parse_cpumask("00000000,0000ff0f") == (0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15)
    assert parse_cpumask("1,00000001") == (0, 32)
    assert parse_cpumask("fffff") == tuple(range(20))
    with pytest.raises(ValueError):
        parse_cpumask("zz,00000000")


def test_parse_lscpu_core_is_socket_and_core_pair():
    # Core numbers restart in every socket: CORE alone would merge CPUs 0 and 2.
    text = "# CPU,Core,Socket,Node,Online\n0,0,0,0,Y\n1,1,0,0,Y\n2,0,1,1,Y\n3,1,1,1,Y\n4,,,,N\n"
    m = parse_lscpu(text)
    assert [c.cpus for c in m.cores] == [(0,), (1,), (2,), (3,)]
    assert m.cpus_online == (0, 1, 2, 3)
    assert [p.cpus for p in m.packages] == [(0, 1), (2, 3)]
    assert [(n.id, n.cpus) for n in m.nodes] == [(0, (0, 1)), (1, (2, 3))]


def test_parse_lscpu_default_columns_from_header():
    text = ("# The following is the parsable format\n# CPU,Core,Socket,Node,,L1d,L1i,L2,L3\n"
            "0,0,0,0,,0,0,0,0\n1,0,0,0,,0,0,0,0\n2,1,0,,,1,1,1,0\n")
    m = parse_lscpu(text)
    assert [c.cpus for c in m.cores] == [(0, 1), (2,)]


def test_parse_lscpu_garbage_names_the_line():
    with pytest.raises(TopologyError, match=":2: SOCKET 'x'"):
        parse_lscpu("# CPU,Core,Socket\n0,0,x\n")
    with pytest.raises(TopologyError):
        parse_lscpu("nothing here\n")


# --- generated trees -------------------------------------------------------------------------


def test_article_machine_interleaved(tmp_path):
    root = write_sysfs_tree(tmp_path, sockets=2, cores_per_node=24, threads_per_core=2)
    m = read_machine(root)
    assert m.node(0).cpus == tuple(range(24)) + tuple(range(48, 72))
    assert m.node(1).cpus == tuple(range(24, 48)) + tuple(range(72, 96))
    assert len(m.cores) == 48 and m.cores[0].cpus == (0, 48) and m.cores[47].cpus == (47, 95)
    assert [p.nodes for p in m.packages] == [(0,), (1,)]
    assert [c.package for c in m.cores[:2]] == [0, 0] and m.cores[24].package == 1
    assert m.cpus_usable == tuple(range(96)) and m.nodes_usable == (0, 1)
    assert m.physical_cpu(m.cores[3]) == 3
    assert m.node(0).memory_bytes == 16 << 30
    assert m.node(0).distances == (10, 21)
    assert {"avx2", "avx512f"} <= m.flags and "sse2" not in m.flags
    assert len(m.l3_domains) == 2 and m.cores[30].l3 == 1
    assert not m.warnings


def test_adjacent_numbering_and_nodes_per_socket(tmp_path):
    root = write_sysfs_tree(tmp_path, sockets=2, nodes_per_socket=2, cores_per_node=2,
                            threads_per_core=2, numbering="adjacent")
    m = read_machine(root)
    assert [c.cpus for c in m.cores] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11),
                                         (12, 13), (14, 15)]
    assert [p.nodes for p in m.packages] == [(0, 1), (2, 3)]
    assert [c.node for c in m.cores] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_core_identity_falls_back_to_masks(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=2, threads_per_core=2)
    for name in ("core_cpus_list", "thread_siblings_list", "core_cpus", "package_cpus_list",
                 "core_siblings_list", "package_cpus"):
        for f in root.glob(f"{CPU}/cpu*/topology/{name}"):
            f.unlink()
    m = read_machine(root)  # thread_siblings / core_siblings masks remain
    assert [c.cpus for c in m.cores] == [(0, 2), (1, 3)]
    assert [p.cpus for p in m.packages] == [(0, 1, 2, 3)]


def test_node_membership_from_cpumap(tmp_path):
    root = write_sysfs_tree(tmp_path, sockets=2, cores_per_node=2)
    for f in root.glob(f"{NODE}/node*/cpulist"):
        f.unlink()
    m = read_machine(root)
    assert [n.cpus for n in m.nodes] == [(0, 1), (2, 3)]


def test_offline_cpus(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=4, threads_per_core=2, offline=(5, 6, 2))
    m = read_machine(root)
    assert m.cpus_online == (0, 1, 3, 4, 7)
    assert [c.cpus for c in m.cores] == [(0, 4), (1,), (3, 7)]  # core (2, 6) is fully offline
    assert m.node(0).cpus == m.cpus_online
    assert m.cpus_usable == m.cpus_online


def test_offline_without_cpu_online_file_uses_per_cpu_files(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=4, offline=(2,))
    (root / CPU / "online").unlink()
    assert read_machine(root).cpus_online == (0, 1, 3)


def test_affinity_and_cgroup_limit_usable(tmp_path):
    root = write_sysfs_tree(tmp_path, sockets=2, cores_per_node=4, threads_per_core=2,
                            allowed_cpus="0-5,8-13", cgroup_cpus="2-15", cgroup_mems="1")
    m = read_machine(root)
    # cores are (i, i + 8); affinity ∩ cgroup = 2-5,8-13
    assert m.cpus_usable == (2, 3, 4, 5, 8, 9, 10, 11, 12, 13)
    assert m.nodes_usable == (1,)
    assert [c.cpus for c in m.usable_cores()] == [(0, 8), (1, 9), (2, 10), (3, 11), (4, 12),
                                                  (5, 13)]
    assert m.physical_cpu(m.cores[0]) == 8 and m.physical_cpu(m.cores[2]) == 2
    cores = machine_to_dict(m)["cores"]
    assert cores[0]["usable_cpus"] == [8] and cores[6]["usable_cpus"] == []


def test_cgroup_v1_cpuset(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=4)
    (root / "proc/self/cgroup").write_text("3:cpuset:/job\n2:cpu,cpuacct:/job\n")
    (root / "proc/self/mounts").write_text(
        "cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0\n"
        "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n")
    job = root / "sys/fs/cgroup/cpuset/job"
    job.mkdir(parents=True)
    (job / "cpuset.cpus").write_text("1-2\n")
    (job / "cpuset.mems").write_text("0\n")
    quota = root / "sys/fs/cgroup/cpu,cpuacct/job"
    quota.mkdir(parents=True)
    (quota / "cpu.cfs_quota_us").write_text("50000\n")
    (quota / "cpu.cfs_period_us").write_text("100000\n")
    m = read_machine(root)
    assert m.cpus_usable == (1, 2)
    assert m.cgroup_cpu_quota == 0.5
    assert any("cpu.max" in w for w in m.warnings)


def test_cgroup_v2_from_older_proc_self_cpuset(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=4, cgroup_cpus="3")
    (root / "proc/self/cgroup").unlink()
    (root / "proc/self/cpuset").write_text("/numabench.slice/job\n")
    assert read_machine(root).cpus_usable == (3,)


def test_cpu_max_quota_below_cores_warns(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=4, cgroup_cpus="0-3")
    (root / "sys/fs/cgroup/numabench.slice/job/cpu.max").write_text("200000 100000\n")
    m = read_machine(root)
    assert m.cgroup_cpu_quota == 2.0
    assert any("cpu.max allows 2 CPUs" in w and "4 cores" in w for w in m.warnings)
    (root / "sys/fs/cgroup/numabench.slice/job/cpu.max").write_text("max 100000\n")
    assert read_machine(root).cgroup_cpu_quota is None


def test_isolated_and_nohz_full_warn(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=4)
    (root / CPU / "isolated").write_text("2-3\n")
    (root / CPU / "nohz_full").write_text("3\n")
    m = read_machine(root)
    assert m.cpus_isolated == (2, 3) and m.cpus_nohz_full == (3,)
    assert any("2-3 are isolated" in w for w in m.warnings)
    assert any("3 are nohz_full" in w for w in m.warnings)


def test_memory_only_nodes_and_sparse_ids(tmp_path):
    root = write_sysfs_tree(tmp_path, sockets=2, cores_per_node=2, memory_only_nodes=2,
                            node_ids=(0, 8, 33, 72), node_memory_bytes=4 << 30)
    m = read_machine(root)
    assert [n.id for n in m.nodes] == [0, 8, 33, 72]
    assert [n.memory_only for n in m.nodes] == [False, False, True, True]
    assert [c.node for c in m.cores] == [0, 0, 8, 8]
    assert m.nodes_usable == (0, 8, 33, 72)
    assert all(n.memory_bytes == 4 << 30 for n in m.nodes)
    assert "memory-only" in render_machine(m).lower()


def test_hybrid_core_kinds(tmp_path):
    root = write_sysfs_tree(tmp_path, hybrid=(2, 4), threads_per_core=2, numbering="adjacent")
    m = read_machine(root)
    assert [(c.cpus, c.kind) for c in m.cores] == [
        ((0, 1), "performance"), ((2, 3), "performance"), ((4,), "efficiency"),
        ((5,), "efficiency"), ((6,), "efficiency"), ((7,), "efficiency")]
    # Without cpu_core/cpu_atom, the max frequency is the last resort.
    shutil.rmtree(root / "sys/devices/cpu_core")
    assert [c.kind for c in read_machine(root).cores] == [c.kind for c in m.cores]


def test_uniform_when_frequencies_are_close(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=3)
    for cpu, f in enumerate((5000000, 5200000, 5000000)):  # Turbo Boost Max 3.0 favoured core
        (root / CPU / f"cpu{cpu}/cpufreq").mkdir()
        (root / CPU / f"cpu{cpu}/cpufreq/cpuinfo_max_freq").write_text(f"{f}\n")
    assert read_machine(root).kinds == ("uniform",)


def test_json_round_trip_and_keys(tmp_path):
    root = write_sysfs_tree(tmp_path, sockets=2, cores_per_node=2, threads_per_core=2,
                            memory_only_nodes=1, allowed_cpus="0-2")
    m = read_machine(root)
    d = machine_to_dict(m)
    assert d["version"] == 1
    assert d["cpus"]["online"] == list(range(8)) and d["cpus"]["usable"] == [0, 1, 2]
    assert d["packages"][1] == {"index": 1, "id": 1, "cpus": [2, 3, 6, 7], "nodes": [1]}
    assert d["nodes"][2]["cpus"] == [] and d["nodes"][2]["memory_only"]
    assert d["nodes"][0]["memory_bytes"] == 16 << 30
    assert d["cores"][0] == {"cpus": [0, 4], "usable_cpus": [0], "package": 0, "node": 0,
                             "l3": 0, "cluster": None, "die": None, "kind": "uniform",
                             "core_id": 0}
    back = machine_from_dict(d)
    assert back == m and back.warnings == m.warnings and back.dies == m.dies
    with pytest.raises(TopologyError):
        machine_from_dict({"version": 99})
    with pytest.raises(TopologyError):
        machine_from_dict({"version": 1, "cpus": {}})


def test_render_shows_siblings_usability_and_memory(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=2, threads_per_core=2, allowed_cpus="0,1,2")
    text = render_machine(read_machine(root))
    assert "Package 0 (id 0)" in text and "Node 0: 16.0 GiB" in text
    assert "core 0,2" in text and "usable" in text and "usable: 1" in text
    assert "avx512f" in text


# --- bad input -------------------------------------------------------------------------------


def test_root_without_sysfs_is_a_clear_error(tmp_path):
    with pytest.raises(TopologyError, match=r"sys/devices/system/cpu: missing"):
        read_machine(tmp_path)


@pytest.mark.parametrize("rel", [
    f"{CPU}/online", f"{CPU}/cpu1/topology/core_cpus_list", f"{NODE}/node0/cpulist",
    f"{CPU}/cpu0/topology/package_cpus_list",
])
def test_garbage_list_names_the_file(tmp_path, rel):
    root = write_sysfs_tree(tmp_path, cores_per_node=2)
    (root / rel).write_text("zero-one\n")
    with pytest.raises(TopologyError, match=rel.replace("/", r"/")):
        read_machine(root)


def test_garbage_mask_names_the_file(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=2)
    (root / f"{NODE}/node0/cpulist").unlink()
    (root / f"{NODE}/node0/cpumap").write_text("xyz\n")
    with pytest.raises(TopologyError, match="node0/cpumap: not a CPU mask"):
        read_machine(root)


def test_garbage_affinity_and_cgroup_are_errors(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=2, cgroup_cpus="0")
    (root / "sys/fs/cgroup/numabench.slice/job/cpuset.cpus.effective").write_text("?\n")
    with pytest.raises(TopologyError, match="cpuset.cpus.effective"):
        read_machine(root)
    root = write_sysfs_tree(tmp_path / "b", cores_per_node=2)
    (root / "proc/self/status").write_text("Cpus_allowed_list:\tnope\n")
    with pytest.raises(TopologyError, match="proc/self/status"):
        read_machine(root)


def test_unreadable_optional_files_warn(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=2)
    # A directory where a file should be: unreadable even for root.
    (root / f"{NODE}/node0/meminfo").unlink()
    (root / f"{NODE}/node0/meminfo").mkdir()
    (root / f"{NODE}/node0/distance").write_text("ten\n")
    (root / "proc/cpuinfo").unlink()
    m = read_machine(root)
    assert m.node(0).memory_bytes is None and m.node(0).distances == ()
    assert any("meminfo: cannot read" in w for w in m.warnings)
    assert any("distance: not a list of integers" in w for w in m.warnings)
    assert any("cpuinfo: missing" in w for w in m.warnings)
    assert m.flags == frozenset()


def test_unreadable_topology_file_warns_and_falls_back(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=2, threads_per_core=2)
    (root / f"{CPU}/cpu1/topology/core_cpus_list").unlink()
    (root / f"{CPU}/cpu1/topology/core_cpus_list").mkdir()
    m = read_machine(root)
    assert any("cpu1/topology/core_cpus_list: cannot read" in w for w in m.warnings)
    assert [c.cpus for c in m.cores] == [(0, 2), (1, 3)]  # from thread_siblings_list


def test_missing_topology_folders_fall_back(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=2, threads_per_core=2)
    for cpu in range(4):
        shutil.rmtree(root / f"{CPU}/cpu{cpu}/topology")
    m = read_machine(root)
    assert [c.cpus for c in m.cores] == [(0,), (1,), (2,), (3,)]
    assert any("no topology files" in w for w in m.warnings)
    lscpu = "# CPU,Core,Socket,Node,Online\n0,0,0,0,Y\n1,1,0,0,Y\n2,0,0,0,Y\n3,1,0,0,Y\n"
    m = read_machine(root, lscpu_text=lscpu)
    assert [c.cpus for c in m.cores] == [(0, 2), (1, 3)]
    assert any("taken from lscpu" in w for w in m.warnings)


def test_lscpu_disagreement_is_reported(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=2, threads_per_core=2)
    agree = "# CPU,Core,Socket,Node,Online\n0,0,0,0,Y\n1,1,0,0,Y\n2,0,0,0,Y\n3,1,0,0,Y\n"
    assert not read_machine(root, lscpu_text=agree).warnings
    disagree = "# CPU,Core,Socket,Node,Online\n0,0,0,0,Y\n1,0,0,0,Y\n2,1,0,0,Y\n3,1,0,0,N\n"
    warnings = read_machine(root, lscpu_text=disagree).warnings
    assert any("online CPUs" in w for w in warnings)
    assert any("disagrees on cores" in w for w in warnings)


def test_no_numa_folder_means_one_node(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=2)
    shutil.rmtree(root / NODE)
    (root / "proc/meminfo").write_text("MemTotal:       1024 kB\n")
    m = read_machine(root)
    assert [(n.id, n.cpus, n.memory_bytes) for n in m.nodes] == [(0, (0, 1), 1 << 20)]
    assert any("no NUMA nodes" in w for w in m.warnings)


# ---- issue 10: trees a batch scheduler or a broken capture produce --------------------------


def test_a_cpu_in_two_nodes_is_an_error_naming_both(tmp_path):
    root = write_sysfs_tree(tmp_path, sockets=2, cores_per_node=2)
    (root / "sys/devices/system/node/node1/cpulist").write_text("0-1,3\n")
    with pytest.raises(TopologyError, match=r"node0/cpulist and .*node1/cpulist both list CPU 0.*"
                                            r"nodes 0 and 1"):
        read_machine(root)


def _v1_cpuset_job(root, mount_line: str, files: dict[str, str], cgroup: str = "/job") -> None:
    (root / "proc/self/cgroup").write_text(f"3:cpuset:{cgroup}\n")
    (root / "proc/self/mounts").write_text(mount_line + "\n")
    job = root / "sys/fs/cgroup/cpuset/job"
    job.mkdir(parents=True)
    for name, text in files.items():
        (job / name).write_text(text)


def test_cgroup_v1_cpuset_mounted_with_noprefix(tmp_path):
    root = write_sysfs_tree(tmp_path, sockets=2, cores_per_node=2)
    _v1_cpuset_job(root, "cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset,noprefix 0 0",
                   {"cpus": "1,3\n", "mems": "1\n"})
    m = read_machine(root)
    assert m.cpus_usable == (1, 3) and m.nodes_usable == (1,)


def test_legacy_cpuset_filesystem(tmp_path):
    root = write_sysfs_tree(tmp_path, sockets=2, cores_per_node=2)
    _v1_cpuset_job(root, "cpuset /sys/fs/cgroup/cpuset cpuset rw,relatime 0 0",
                   {"cpus": "2\n", "mems": "0\n"})
    (root / "proc/self/cgroup").unlink()  # old kernels: only /proc/self/cpuset
    (root / "proc/self/cpuset").write_text("/job\n")
    m = read_machine(root)
    assert m.cpus_usable == (2,) and m.nodes_usable == (0,)


def test_mountinfo_subtree_mount_and_noprefix_in_super_options(tmp_path):
    """A container sees its own cgroup (/slurm/job) mounted at the hierarchy's mount point:
    mountinfo's root field says so, and cpuset/noprefix are superblock options there."""
    root = write_sysfs_tree(tmp_path, sockets=2, cores_per_node=2)
    _v1_cpuset_job(root, "", {"cpus": "0-1\n", "mems": "0\n"}, cgroup="/slurm/job")
    (root / "proc/self/mountinfo").write_text(
        "30 25 0:26 /slurm /sys/fs/cgroup/cpuset rw,nosuid shared:9 - cgroup cgroup "
        "rw,cpuset,noprefix\n")
    m = read_machine(root)
    assert m.cpus_usable == (0, 1) and m.nodes_usable == (0,)


@pytest.mark.parametrize("online", ["0-99999999999", "0-8192", "9" * 5000])
def test_online_list_beyond_the_kernel_limit_is_refused_before_expanding(tmp_path, online):
    root = write_sysfs_tree(tmp_path, cores_per_node=2)
    (root / CPU / "online").write_text(online + "\n")
    with pytest.raises(TopologyError, match="online: .*beyond the kernel's limit of 8192 CPUs"):
        read_machine(root)
