{{/*
Named templates.

The templates marked PUBLIC are the sidecar contract: an application chart that lists
tokengate as a dependency (values under `tokengate:`, with `mode: sidecar`) includes them
in its own pod template, passing a context built from its own release:

  {{- $tg := dict "Values" .Values.tokengate "Release" .Release }}

They therefore read only .Values and .Release, never .Chart or .Template (which would be
the application chart's), and derive names from "tokengate" rather than .Chart.Name, so
they name the same ConfigMap and Secret this chart renders as a subchart.
*/}}

{{- define "tokengate.name" -}}
{{- default "tokengate" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokengate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "tokengate.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Standard labels; this chart's own objects only (they read .Chart). */}}
{{- define "tokengate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tokengate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tokengate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokengate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tokengate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tokengate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tokengate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (required "image.tag is required" .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Ports come from tokengate's own config, so the two can never disagree. */}}
{{- define "tokengate.httpPort" -}}
{{- dig "listen" "port" 8080 .Values.config }}
{{- end }}

{{- define "tokengate.adminPort" -}}
{{- dig "admin" "port" 9090 .Values.config }}
{{- end }}

{{/* The Secret mounted as files: the user's own, or the one this chart creates. */}}
{{- define "tokengate.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else if .Values.secret.data }}
{{- include "tokengate.fullname" . }}
{{- end }}
{{- end }}

{{/*
PUBLIC: terminationGracePeriodSeconds for a pod running tokengate. SIGTERM starts
shutdown_delay_s of not-ready, then up to shutdown_grace_s of draining; the kubelet must
not SIGKILL before both have passed. Defaults are settings.py's.
*/}}
{{- define "tokengate.terminationGracePeriodSeconds" -}}
{{- if .Values.terminationGracePeriodSeconds }}
{{- .Values.terminationGracePeriodSeconds }}
{{- else }}
{{- $delay := dig "limits" "shutdown_delay_s" 5 .Values.config }}
{{- $grace := dig "limits" "shutdown_grace_s" 20 .Values.config }}
{{- add (ceil (addf $delay $grace) | int) .Values.terminationGraceMarginSeconds }}
{{- end }}
{{- end }}

{{/*
PUBLIC: pod annotations. The checksums roll the pods when the configuration (or a
chart-created Secret) changes: tokengate reads both once, at start-up.
*/}}
{{- define "tokengate.podAnnotations" -}}
checksum/tokengate-config: {{ toYaml .Values.config | sha256sum }}
{{- if and .Values.secret.data (not .Values.secret.existingSecret) }}
checksum/tokengate-secret: {{ toYaml .Values.secret.data | sha256sum }}
{{- end }}
{{- if .Values.metrics.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ include "tokengate.adminPort" . | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/*
PUBLIC: the tokengate container, as one item of a `containers:` list. The standalone
Deployment uses it too, so both modes run the same container spec. Port names carry a
tg- prefix so they cannot clash with the application container's own "http".
*/}}
{{- define "tokengate.sidecarContainer" -}}
- name: tokengate
  image: {{ include "tokengate.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run", "--config", "/etc/tokengate/tokengate.yaml"]
  ports:
    - name: tg-http
      containerPort: {{ include "tokengate.httpPort" . }}
      protocol: TCP
    - name: tg-admin
      containerPort: {{ include "tokengate.adminPort" . }}
      protocol: TCP
  {{- with .Values.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  startupProbe:
    httpGet: {path: /healthz, port: tg-admin}
    {{- toYaml .Values.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet: {path: /healthz, port: tg-admin}
    {{- toYaml .Values.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet: {path: /readyz, port: tg-admin}
    {{- toYaml .Values.probes.readiness | nindent 4 }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    # subPath: the file lands beside the secrets directory instead of hiding it. It does
    # not follow ConfigMap updates, which is fine: the checksum annotation rolls the pods.
    - name: tokengate-config
      mountPath: /etc/tokengate/tokengate.yaml
      subPath: tokengate.yaml
      readOnly: true
    {{- if include "tokengate.secretName" . }}
    - name: tokengate-secrets
      mountPath: /etc/tokengate/secrets
      readOnly: true
    {{- end }}
    - name: tokengate-tmp
      mountPath: /tmp
{{- end }}

{{/*
PUBLIC: every volume the tokengate container mounts, as items of a `volumes:` list:
its configuration, its secrets when there are any, and the /tmp emptyDir that a
read-only root filesystem requires.
*/}}
{{- define "tokengate.configVolume" -}}
- name: tokengate-config
  configMap:
    name: {{ include "tokengate.fullname" . }}
{{- with include "tokengate.secretName" . }}
- name: tokengate-secrets
  secret:
    secretName: {{ . }}
    # 292 = 0444 (decimal: YAML 1.1 and 1.2 read a leading 0 differently). World-readable
    # because only the tokengate container mounts this volume, and in sidecar mode the
    # application's pod may not set fsGroup 10001, which 0440 would need.
    defaultMode: 292
{{- end }}
- name: tokengate-tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
{{- end }}
