using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.Models.StableDiffusion;
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

    /// <summary>Metadata key of a stage-2 checkpoint's control mode: irc (IRControlNet), v5 (concat features), v6 (SFT).</summary>
    public const string ControlModeKey = "control_mode";

    /// <summary>
    /// The control mode a ControlNet checkpoint was trained with (its <see cref="ControlModeKey"/> metadata); official
    /// checkpoints and files without the key are IRControlNet. Reads only the safetensors header.
    /// </summary>
    public static ControlMode ControlModeOf(string path)
    {
        if (!SafeTensors.LooksLikeSafeTensors(path)) return ControlMode.Add;
        var meta = SafeTensors.ReadHeader(path).Metadata;
        return meta.TryGetValue(ControlModeKey, out var v) ? v switch
        {
            "irc" => ControlMode.Add,
            "v5" => ControlMode.ConcatFeatures,
            "v6" => ControlMode.Sft,
            _ => throw new CheckpointException(path, $"unknown {ControlModeKey} '{v}' in the metadata (known: irc, v5, v6)"),
        } : ControlMode.Add;
    }
}
