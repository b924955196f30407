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
            var parts = path.Split('/');
            int k = Array.FindIndex(parts, p => p.StartsWith("libtorch-", StringComparison.OrdinalIgnoreCase));
            return k >= 0 && k + 1 < parts.Length ? parts[k + 1] : $"unknown ({path})";
        }
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
