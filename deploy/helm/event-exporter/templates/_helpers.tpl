{{/*
Chart name, truncated to a DNS label.
*/}}
{{- define "event-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: <release>-event-exporter, or the release name when it already contains the
chart name.
*/}}
{{- define "event-exporter.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "event-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "event-exporter.labels" -}}
helm.sh/chart: {{ include "event-exporter.chart" . }}
{{ include "event-exporter.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/component: event-exporter
app.kubernetes.io/part-of: nvsentinel
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "event-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "event-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
"true" unless global.eventExporter.enabled is set to false (the umbrella chart's switch).
*/}}
{{- define "event-exporter.enabled" -}}
{{- $global := .Values.global | default dict }}
{{- $module := $global.eventExporter | default dict }}
{{- if and (hasKey $module "enabled") (not (kindIs "invalid" $module.enabled)) }}
{{- ternary "true" "false" (eq (toString $module.enabled | lower) "true") }}
{{- else }}
{{- "true" }}
{{- end }}
{{- end }}

{{/*
Port of /metrics, /healthz and /readyz: global.metricsPort, default 2112.
*/}}
{{- define "event-exporter.metricsPort" -}}
{{- $global := .Values.global | default dict }}
{{- $global.metricsPort | default 2112 | int }}
{{- end }}

{{- define "event-exporter.image" -}}
{{- $global := .Values.global | default dict }}
{{- $globalImage := $global.image | default dict }}
{{- $tag := .Values.image.tag | default $globalImage.tag | default .Chart.AppVersion }}
{{- printf "%s:%s" .Values.image.repository (toString $tag) }}
{{- end }}

{{- define "event-exporter.datastoreConfigMap" -}}
{{- .Values.datastore.configMapName | default (printf "%s-datastore-config" .Release.Name) }}
{{- end }}

{{/*
Effective CloudEvent metadata as JSON: top-level `metadata` merged with `exporter.metadata`;
exporter.metadata wins a key set in both, except that the chart's own placeholders
(cluster: my-cluster, environment: production) never override a value from `metadata`.
*/}}
{{- define "event-exporter.metadata" -}}
{{- $placeholders := dict "cluster" "my-cluster" "environment" "production" }}
{{- $result := dict }}
{{- range $key, $value := (.Values.metadata | default dict) }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $result $key (toString $value) }}
{{- end }}
{{- end }}
{{- range $key, $value := (.Values.exporter.metadata | default dict) }}
{{- if not (kindIs "invalid" $value) }}
{{- $isPlaceholder := and (hasKey $placeholders $key) (eq (toString $value) (get $placeholders $key)) }}
{{- if not (and $isPlaceholder (hasKey $result $key)) }}
{{- $_ := set $result $key (toString $value) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $result }}
{{- end }}

{{/*
TOML renderers. A JSON string (Go's encoding: ", \ and control characters escaped) is a valid
TOML basic string once DEL is escaped too; keys are always quoted this way, so a metadata key
such as topology.kubernetes.io/zone stays one key.
*/}}
{{- define "event-exporter.tomlString" -}}
{{- toString . | toJson | replace "\u007f" "\\u007f" }}
{{- end }}

{{- define "event-exporter.tomlBool" -}}
{{- ternary "true" "false" (eq (toString . | lower) "true") }}
{{- end }}

{{- define "event-exporter.tomlInt" -}}
{{- int64 . }}
{{- end }}

{{/*
A TOML float: 2 becomes 2.0 so the value keeps its type.
*/}}
{{- define "event-exporter.tomlFloat" -}}
{{- $text := toString (float64 .) }}
{{- if regexMatch "^-?[0-9]+$" $text }}{{ $text }}.0{{ else }}{{ $text }}{{ end }}
{{- end }}

{{/*
Seconds (a float) in a Go duration string such as 20s, 1m30s, 1.5m or 500ms; fails on anything
else.
*/}}
{{- define "event-exporter.durationSeconds" -}}
{{- $text := toString . | trim }}
{{- if not (regexMatch "^(([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+$" $text) }}
{{- fail (printf "shutdownGrace: %q is not a Go duration (examples: 20s, 1m30s)" $text) }}
{{- end }}
{{- $units := dict "ns" 0.000000001 "us" 0.000001 "µs" 0.000001 "μs" 0.000001 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 }}
{{- $total := 0.0 }}
{{- range (regexFindAll "([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)" $text -1) }}
{{- $number := regexFind "^([0-9]+(\\.[0-9]*)?|\\.[0-9]+)" . }}
{{- $unit := trimPrefix $number . }}
{{- $total = addf $total (mulf (float64 $number) (get $units $unit)) }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
A TOML array of integers (HTTP statuses): [400, 413].
*/}}
{{- define "event-exporter.tomlIntList" -}}
[{{- range $i, $value := . }}{{ if $i }}, {{ end }}{{ int64 $value }}{{- end }}]
{{- end }}

{{/*
The dead letter's rules, checked at render time (the root filesystem is read-only, so the file
needs a volume): deadLetter only with onRejected: dead_letter, which needs a file or an
endpoint; a file needs deadLetterVolume (existingClaim or emptyDir, not both) and must lie under
its mountPath.
*/}}
{{- define "event-exporter.validateDeadLetter" -}}
{{- $retry := .Values.exporter.failureHandling | default dict }}
{{- $onRejected := toString ($retry.onRejected | default "stop") }}
{{- $deadLetter := $retry.deadLetter | default dict }}
{{- $file := trim (toString ($deadLetter.file | default "")) }}
{{- $endpoint := trim (toString ($deadLetter.endpoint | default "")) }}
{{- $volume := .Values.deadLetterVolume | default dict }}
{{- $claim := trim (toString ($volume.existingClaim | default "")) }}
{{- $emptyDir := eq (include "event-exporter.tomlBool" $volume.emptyDir) "true" }}
{{- $mountPath := trimSuffix "/" (toString ($volume.mountPath | default "/var/lib/event-exporter")) }}
{{- if eq $onRejected "dead_letter" }}
{{- if and (not $file) (not $endpoint) }}
{{- fail "exporter.failureHandling.onRejected is dead_letter: set exporter.failureHandling.deadLetter.file and/or exporter.failureHandling.deadLetter.endpoint (where rejected events are written)" }}
{{- end }}
{{- else if or $file $endpoint }}
{{- fail (printf "exporter.failureHandling.deadLetter is only used with exporter.failureHandling.onRejected: dead_letter (it is %q, which never writes it)" $onRejected) }}
{{- end }}
{{- if and $claim $emptyDir }}
{{- fail "deadLetterVolume: set existingClaim or emptyDir, not both" }}
{{- end }}
{{- if $file }}
{{- if not (or $claim $emptyDir) }}
{{- fail (printf "exporter.failureHandling.deadLetter.file (%s) needs a writable volume (the root filesystem is read-only): set deadLetterVolume.existingClaim to a PersistentVolumeClaim, or deadLetterVolume.emptyDir: true (lost with the pod)" $file) }}
{{- end }}
{{- if not (hasPrefix (printf "%s/" $mountPath) $file) }}
{{- fail (printf "exporter.failureHandling.deadLetter.file (%s) must lie under deadLetterVolume.mountPath (%s): the rest of the root filesystem is read-only" $file $mountPath) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"true" when deadLetterVolume asks for a volume (existingClaim or emptyDir).
*/}}
{{- define "event-exporter.deadLetterVolumeEnabled" -}}
{{- $volume := .Values.deadLetterVolume | default dict }}
{{- ternary "true" "false" (or (ne (trim (toString ($volume.existingClaim | default ""))) "") (eq (include "event-exporter.tomlBool" $volume.emptyDir) "true")) }}
{{- end }}
