using System.Runtime.InteropServices;
using System.Text.Json.Nodes;
using TorchSharp;

namespace DiffBIR.Lab;

/// <summary>
/// What a run ran on, for manifests: library versions, the libtorch file the process actually loaded (a system or
/// conda PyTorch on the library path can be picked up instead of the pinned one), device and thread count.
/// </summary>
public static class RunInfo
{
    /// <summary>The libtorch the pinned packages bring.</summary>
    public const string PinnedLibTorch = "2.10.0";

    /// <summary>Path of the loaded libtorch_cpu (from /proc/self/maps on Linux), or null when it cannot be told.</summary>
    public static string? LibTorchPath
    {
        get
        {
            try
            {
                if (!File.Exists("/proc/self/maps")) return null;
                foreach (var line in File.ReadLines("/proc/self/maps"))
                {
                    int i = line.IndexOf('/');
                    if (i >= 0 && line.Contains("libtorch_cpu.so", StringComparison.Ordinal)) return line[i..];
                }
            }
            catch (IOException) { }
            return null;
        }
    }

    /// <summary>The loaded libtorch's version as its package folder names it ("2.10.0"), else "unknown (path)".</summary>
    public static string LibTorchVersion
    {
        get
        {
            var path = LibTorchPath;
            if (path is null) return "unknown";
            if (IsBundled(path)) return PinnedLibTorch;
            var parts = path.Split('/');
            int k = Array.FindIndex(parts, p => p.StartsWith("libtorch-", StringComparison.OrdinalIgnoreCase));
            return k >= 0 && k + 1 < parts.Length ? parts[k + 1] : $"unknown ({path})";
        }
    }

    /// <summary>
    /// Loads the pinned libtorch (package libtorch-cpu-linux-x64 <see cref="PinnedLibTorch"/> in the NuGet cache) by
    /// full path, before TorchSharp looks for <c>libtorch_cpu.so</c> by name: with a system or conda PyTorch on the
    /// library path (Debian's python3-torch puts libtorch 1.13 there) a notebook kernel would otherwise load that one
    /// and fail at the first tensor. Call it before the first tensor. Returns the file now loaded, or null where the
    /// package is not in the cache (then TorchSharp's own search runs; <see cref="LibTorchWarning"/> tells what it found).
    /// </summary>
    public static string? UsePinnedLibTorch()
    {
        if (!OperatingSystem.IsLinux()) return null;
        if (LibTorchPath is { } loaded) return loaded;
        var root = Environment.GetEnvironmentVariable("NUGET_PACKAGES");
        if (string.IsNullOrEmpty(root)) root = Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".nuget", "packages");
        var dir = Path.Combine(root, "libtorch-cpu-linux-x64", PinnedLibTorch, "runtimes", "linux-x64", "native");
        if (!Directory.Exists(dir)) return null;
        // dependencies first, each by full path, so that nothing is resolved through the system's library path
        foreach (var pattern in new[] { "libgomp*.so*", "libc10.so", "libtorch_cpu.so", "libtorch.so" })
            foreach (var f in Directory.GetFiles(dir, pattern).OrderBy(x => x, StringComparer.Ordinal))
                NativeLibrary.Load(f);
        return LibTorchPath;
    }

    /// <summary>The copy the build put beside the application (bin/…/runtimes): the pinned package's files.</summary>
    static bool IsBundled(string path) =>
        path.StartsWith(Path.Combine(AppContext.BaseDirectory, "runtimes") + "/", StringComparison.Ordinal)
        || Path.GetDirectoryName(path) == Path.TrimEndingDirectorySeparator(AppContext.BaseDirectory);

    /// <summary>One line when the libtorch in this process is not the pinned one (which file, which version), else null.</summary>
    public static string? LibTorchWarning()
    {
        var path = LibTorchPath;
        if (path is null) return null;
        if (IsBundled(path) || path.Contains($"/libtorch-cpu-linux-x64/{PinnedLibTorch}/", StringComparison.OrdinalIgnoreCase)
            || path.Contains("/libtorch-cuda", StringComparison.OrdinalIgnoreCase) || path.Contains("/torch/lib/", StringComparison.Ordinal))
            return null;
        return $"warning: libtorch was loaded from {path}, not the pinned libtorch {PinnedLibTorch}: another PyTorch on the library path was found first (call RunInfo.UsePinnedLibTorch() before the first tensor); results may differ or fail";
    }

    /// <summary>Versions, device, threads and the libtorch file, as a JSON object for manifests.</summary>
    public static JsonObject Manifest(string device, long? seed = null) => new()
    {
        ["diffbir_lab"] = typeof(RunInfo).Assembly.GetName().Version?.ToString(),
        ["torchsharp"] = typeof(torch).Assembly.GetName().Version?.ToString(),
        ["libtorch"] = LibTorchVersion,
        ["libtorch_path"] = LibTorchPath,
        ["dotnet"] = Environment.Version.ToString(),
        ["device"] = device,
        ["threads"] = torch.get_num_threads(),
        ["seed"] = seed,
    };
}
