{{/* The release's name for its objects: <release>-rr-consumer, or the release alone if it says rr-consumer. */}}
{{- define "rr-consumer.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rr-consumer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rr-consumer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rr-consumer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rr-consumer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "rr-consumer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The metrics and health port: the relay's own setting, so probes, Service and relay never disagree. */}}
{{- define "rr-consumer.port" -}}
{{- $observability := .Values.config.observability | default dict -}}
{{- required "config.observability.port must be set: the probes and the metrics Service need the relay's health port" $observability.port | int -}}
{{- end -}}

{{/*
The variable a shop's apiKey is read from: its api_key_env, else RR_API_KEY_<SHOP> with every character
other than a letter or digit made "_" (consumer.config.default_key_env; tests/test_helm.py holds them equal).
*/}}
{{- define "rr-consumer.keyEnv" -}}
{{- $shop := index .shops .name -}}
{{- if and $shop $shop.api_key_env -}}
{{- $shop.api_key_env -}}
{{- else -}}
{{- printf "RR_API_KEY_%s" (regexReplaceAll "[^A-Za-z0-9]" .name "_" | upper) -}}
{{- end -}}
{{- end -}}

{{/*
The relay's configuration file, as rendered into the ConfigMap. Helm reads every number of the values as a
float, so toToml writes 9100 as 9100.0; a whole number at the end of a line is written back as an integer,
so the file reads as an operator would write it (the relay takes an integer for a float setting too).
*/}}
{{- define "rr-consumer.configToml" -}}
{{- regexReplaceAll "(?m)^(\\s*[A-Za-z0-9_\"'.-]+ = -?[0-9]+)\\.0$" (toToml .Values.config) "${1}" -}}
{{- end -}}
