using DiffBIR.Lab.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>
/// Saves what the official training scripts save — <c>swinir.state_dict()</c> (stage 1) or
/// <c>controlnet.state_dict()</c> (stage 2), with the official key names and the persistent buffers — as a
/// safetensors file (atomic write), plus the step and any notes as metadata. Loads back strictly with
/// <see cref="StateDictLoader"/> or any official-compatible loader.
/// </summary>
public static class TrainingCheckpoint
{
    public static void Save(nn.Module module, string path, long step, IReadOnlyDictionary<string, string>? extraMetadata = null)
    {
        var meta = new Dictionary<string, string>(extraMetadata ?? new Dictionary<string, string>())
        {
            ["format"] = "pt",
            ["step"] = step.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["producer"] = "DiffBIR.Lab training",
        };
        var sd = module.state_dict();
        SafeTensors.Save(path, sd, meta);
    }
}
